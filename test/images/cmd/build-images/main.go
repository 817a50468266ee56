// Command build-images writes container image tarballs without a Docker engine.
//
//	build-images base [-out DIR]
//	    the pause and busybox images of the local cluster (DIR/pause.tar, DIR/busybox.tar)
//	build-images binary -ref REF -out FILE -bin SRC:DST [-bin ...] [-file SRC:DST[:MODE] ...]
//	    [-entrypoint ARG ...] [-cmd ARG ...] [-env K=V ...] [-label K=V ...] [-user U]
//	    [-workdir DIR] [-busybox]
//	    an image from static binaries (checked to be static) plus extra files; -busybox adds a
//	    busybox userland for debugging. Entrypoint defaults to the first -bin's DST.
//
// Each written tarball is printed as "REF PATH DIGEST".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/apm-csi/apm-csi/test/images"
)

// repeated is a flag that may be given several times.
type repeated []string

func (r *repeated) String() string     { return strings.Join(*r, ",") }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

func main() {
	if err := run(context.Background(), os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "build-images:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: build-images base|binary [flags] (see -h of each)")
	}
	switch args[0] {
	case "base":
		return runBase(ctx, args[1:])
	case "binary":
		return runBinary(ctx, args[1:])
	default:
		return fmt.Errorf("unknown subcommand %q: want base or binary", args[0])
	}
}

func runBase(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("base", flag.ExitOnError)
	out := fs.String("out", "_output/images", "directory to write pause.tar and busybox.tar into")
	if err := fs.Parse(args); err != nil {
		return err
	}
	moduleDir, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	tarballs, err := images.BuildBase(ctx, moduleDir, *out)
	if err != nil {
		return err
	}
	for _, tb := range tarballs {
		fmt.Println(tb.Ref, tb.Path, tb.Digest)
	}
	return nil
}

func runBinary(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("binary", flag.ExitOnError)
	var bins, files, entrypoint, cmdArgs, env, labels repeated
	ref := fs.String("ref", "", "image reference, e.g. localhost/apm-csi/apm-csi-node:dev")
	out := fs.String("out", "", "tarball to write")
	user := fs.String("user", "", "user (and group) the entrypoint runs as, e.g. 65532:65532")
	workdir := fs.String("workdir", "", "working directory")
	withBusybox := fs.Bool("busybox", false, "add a busybox userland from "+images.DebianBusybox)
	fs.Var(&bins, "bin", "SRC:DST static binary (repeatable)")
	fs.Var(&files, "file", "SRC:DST[:MODE] extra file, MODE in octal (repeatable)")
	fs.Var(&entrypoint, "entrypoint", "entrypoint argument (repeatable; default: first -bin DST)")
	fs.Var(&cmdArgs, "cmd", "cmd argument (repeatable)")
	fs.Var(&env, "env", "KEY=VALUE (repeatable)")
	fs.Var(&labels, "label", "KEY=VALUE image label (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *ref == "" || *out == "" || len(bins) == 0 {
		return errors.New("binary needs -ref, -out and at least one -bin")
	}
	spec := images.Spec{Ref: *ref, Env: env, User: *user, WorkingDir: *workdir, Cmd: cmdArgs, Labels: map[string]string{}}
	for _, b := range bins {
		src, dst, ok := strings.Cut(b, ":")
		if !ok {
			return fmt.Errorf("-bin %q: want SRC:DST", b)
		}
		f, err := images.StaticBinary(src, dst)
		if err != nil {
			return err
		}
		spec.Files = append(spec.Files, f)
	}
	for _, f := range files {
		parts := strings.Split(f, ":")
		if len(parts) < 2 || len(parts) > 3 {
			return fmt.Errorf("-file %q: want SRC:DST[:MODE]", f)
		}
		file := images.File{Source: parts[0], Path: parts[1]}
		if len(parts) == 3 {
			mode, err := strconv.ParseUint(parts[2], 8, 32)
			if err != nil {
				return fmt.Errorf("-file %q: mode: %w", f, err)
			}
			file.Mode = os.FileMode(mode)
		}
		spec.Files = append(spec.Files, file)
	}
	if *withBusybox {
		userland, _, err := images.BusyboxUserland(ctx, images.DebianBusybox)
		if err != nil {
			return err
		}
		spec.Files = append(spec.Files, userland...)
	}
	spec.Entrypoint = entrypoint
	if len(spec.Entrypoint) == 0 {
		spec.Entrypoint = []string{spec.Files[0].Path}
	}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return fmt.Errorf("-label %q: want KEY=VALUE", l)
		}
		spec.Labels[k] = v
	}
	tb, err := images.BuildAndWrite(spec, *out)
	if err != nil {
		return err
	}
	fmt.Println(tb.Ref, tb.Path, tb.Digest)
	return nil
}

// moduleRoot is the directory of the main module's go.mod, where the pause program builds.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("run build-images inside the apm-csi module")
	}
	return strings.TrimSuffix(gomod, "/go.mod"), nil
}
