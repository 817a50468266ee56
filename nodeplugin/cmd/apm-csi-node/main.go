// Command apm-csi-node is the apm-csi CSI node plugin: one container per node that serves the
// CSI Identity and Node services, registers itself with kubelet and answers its own health
// checks, so neither node-driver-registrar nor livenessprobe sidecars are needed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/apm-csi/apm-csi/nodeplugin/plugin"
)

func main() {
	if err := run(); err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "apm-csi-node:", err)
		os.Exit(1)
	}
}

func run() error {
	o, err := parseFlags(os.Args[1:], os.Getenv, os.Stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: o.logLevel}))
	slog.SetDefault(log)
	// mount-utils logs through klog; send it to the same JSON stream.
	klog.SetSlogLogger(log)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	o.Logger = log
	return plugin.Run(ctx, o.Options)
}
