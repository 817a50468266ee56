package tracer

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// npmInstallation is one pinned npm installation kept in <CacheDir>/tracer.
type npmInstallation struct {
	// name is the directory under <CacheDir>/tracer; tmpPrefix prefixes its staging directory.
	name, tmpPrefix string
	// project is the name in the package.json of our own that keeps npm from walking up to
	// any other project.
	project string
	// label names the installation in logs and errors, e.g. dd-trace@5.0.0.
	label string
	// packages are the npm package specs to install.
	packages []string
	// check verifies an installation directory.
	check func(dir string) error
}

// install installs in into <CacheDir>/tracer/<name> with npm (once; later calls reuse a
// directory that passes check) and returns that directory. Install scripts are not run.
func (in npmInstallation) install(ctx context.Context, logf func(string, ...any)) (string, error) {
	cache, err := CacheDir()
	if err != nil {
		return "", err
	}
	base := filepath.Join(cache, "tracer")
	dir := filepath.Join(base, in.name)
	if err := in.check(dir); err == nil {
		return dir, nil
	}
	if err := os.MkdirAll(base, 0o755); err != nil {
		return "", err
	}
	// One installer at a time (go test runs packages in parallel processes).
	lock, err := os.OpenFile(dir+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	if err := in.check(dir); err == nil {
		return dir, nil
	}
	if logf != nil {
		logf("installing %s with npm into %s", in.label, dir)
	}
	tmp, err := os.MkdirTemp(base, in.tmpPrefix)
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	if err := os.WriteFile(filepath.Join(tmp, "package.json"), []byte(`{"name":"`+in.project+`","private":true}`+"\n"), 0o644); err != nil {
		return "", err
	}
	args := append([]string{"install", "--no-audit", "--no-fund", "--no-update-notifier", "--ignore-scripts",
		"--omit=dev", "--save-exact"}, in.packages...)
	cmd := exec.CommandContext(ctx, "npm", args...)
	cmd.Dir = tmp
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("npm install %s: %w\n%s", in.label, err, out.String())
	}
	if err := in.check(tmp); err != nil {
		return "", err
	}
	if err := os.RemoveAll(dir); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", err
	}
	return dir, nil
}
