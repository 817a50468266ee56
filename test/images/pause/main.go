// Command pause is the pod sandbox ("infra") process of the local cluster's pods: it holds the
// pod's namespaces open, reaps the zombies that end up parented to it as PID 1, and exits
// cleanly on SIGINT/SIGTERM. It does what Kubernetes' C pause program does, in Go, so that the
// local cluster needs no image from a public registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reapChildren()
	}
}

// reapChildren collects every exited child without blocking: several SIGCHLDs may arrive as one.
func reapChildren() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
