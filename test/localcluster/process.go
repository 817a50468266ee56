package localcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
)

// processRecord is what <root>/run/<component>.pid holds: enough to find the process again
// from another invocation (the CLI's `down`) and to never signal an unrelated process that
// reused the PID.
type processRecord struct {
	Component  string   `json:"component"`
	PID        int      `json:"pid"`
	StartTicks uint64   `json:"startTicks"`
	Args       []string `json:"args"`
}

func (o Options) pidFile(component string) string {
	return filepath.Join(o.runDir(), component+".pid")
}

// LogPath is the log file of a component (etcd, containerd, kube-apiserver, ...).
func (o Options) LogPath(component string) string {
	return filepath.Join(o.logDir(), component+".log")
}

// startProcess runs a component in the background, in its own session (so that it survives
// the CLI exiting and gets no terminal signals), with stdout and stderr in its log file.
func (o Options) startProcess(component, exe string, args ...string) (*processRecord, error) {
	return o.startProcessEnv(component, exe, nil, args...)
}

// startProcessEnv is startProcess with the given environment (nil: this process's).
func (o Options) startProcessEnv(component, exe string, env []string, args ...string) (*processRecord, error) {
	logFile, err := os.OpenFile(o.LogPath(component), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	fmt.Fprintf(logFile, "# %s %s\n", exe, strings.Join(args, " "))
	cmd := exec.Command(exe, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = o.Root
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", component, err)
	}
	// Reap the child when it exits while this process still runs; a zombie would look alive.
	go func() { _ = cmd.Wait() }()
	ticks, err := processStartTicks(cmd.Process.Pid)
	if err != nil {
		return nil, err
	}
	rec := &processRecord{Component: component, PID: cmd.Process.Pid, StartTicks: ticks, Args: append([]string{exe}, args...)}
	data, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(o.pidFile(component), data, 0o644); err != nil {
		return nil, err
	}
	return rec, nil
}

// processStartTicks reads the start time (field 22 of /proc/PID/stat, in clock ticks since
// boot), which together with the PID identifies a process uniquely.
func processStartTicks(pid int) (uint64, error) {
	state, ticks, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	if state == "Z" || state == "X" {
		return 0, fmt.Errorf("process %d exited", pid)
	}
	return ticks, nil
}

func procStat(pid int) (state string, startTicks uint64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", 0, err
	}
	// The command name (field 2) may contain spaces and parentheses: split after its last ')'.
	end := bytes.LastIndexByte(data, ')')
	if end < 0 {
		return "", 0, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	fields := strings.Fields(string(data[end+1:]))
	if len(fields) < 20 {
		return "", 0, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	startTicks, err = strconv.ParseUint(fields[19], 10, 64)
	return fields[0], startTicks, err
}

// alive reports whether the recorded process still runs (and is not a zombie).
func (r *processRecord) alive() bool {
	state, ticks, err := procStat(r.PID)
	return err == nil && ticks == r.StartTicks && state != "Z" && state != "X"
}

func (o Options) readProcessRecord(component string) (*processRecord, error) {
	data, err := os.ReadFile(o.pidFile(component))
	if err != nil {
		return nil, err
	}
	var rec processRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		return nil, fmt.Errorf("%s: %w", o.pidFile(component), err)
	}
	return &rec, nil
}

// recordedComponents lists the components that have a PID file.
func (o Options) recordedComponents() []string {
	matches, _ := filepath.Glob(filepath.Join(o.runDir(), "*.pid"))
	var out []string
	for _, m := range matches {
		out = append(out, strings.TrimSuffix(filepath.Base(m), ".pid"))
	}
	return out
}

// stopProcess sends SIGTERM, waits up to grace, then SIGKILL, and removes the PID file.
// A missing PID file or an already exited process is not an error.
func (o Options) stopProcess(component string, grace time.Duration) error {
	rec, err := o.readProcessRecord(component)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if rec.alive() {
		o.logf("down: stopping %s (pid %d)", component, rec.PID)
		_ = syscall.Kill(rec.PID, syscall.SIGTERM)
		if !waitExit(rec, grace) {
			o.logf("down: %s did not exit within %s; killing it", component, grace)
			_ = syscall.Kill(rec.PID, syscall.SIGKILL)
			if !waitExit(rec, 5*time.Second) {
				return fmt.Errorf("%s (pid %d) survived SIGKILL", component, rec.PID)
			}
		}
	}
	return os.Remove(o.pidFile(component))
}

// waitExit reports whether the process exits within timeout.
func waitExit(rec *processRecord, timeout time.Duration) bool {
	return wait.PollUntilContextTimeout(context.Background(), 50*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		return !rec.alive(), nil
	}) == nil
}

// logTail returns the last lines of a component's log, for error messages.
func (o Options) logTail(component string, lines int) string {
	data, err := os.ReadFile(o.LogPath(component))
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// componentError wraps err with the tail of the component's log.
func (o Options) componentError(component string, err error) error {
	return fmt.Errorf("%s: %w\n--- last lines of %s ---\n%s", component, err, o.LogPath(component), o.logTail(component, 30))
}
