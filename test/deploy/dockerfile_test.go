package deploy

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"

	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/test/testenv"
)

// The Dockerfiles cannot be built here (no Docker engine, no registry). These checks read them
// for what the images require: multi-stage, static (CGO off), cross-compiled for
// TARGETOS/TARGETARCH on the build platform, pinned base images, OCI labels, a non-root user
// for the webhook, an entrypoint that is the binary the manifests expect, and a build of the
// package that exists in this tree.

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct {
	Cmd  string // upper case
	Args string
}

func parseDockerfile(data string) ([]instruction, error) {
	var out []instruction
	var cur strings.Builder
	sc := bufio.NewScanner(strings.NewReader(data))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if cur.Len() == 0 && (line == "" || strings.HasPrefix(line, "#")) {
			continue
		}
		if cur.Len() > 0 && strings.HasPrefix(line, "#") {
			continue // comments inside a continued instruction
		}
		if strings.HasSuffix(line, "\\") {
			cur.WriteString(strings.TrimSuffix(line, "\\") + " ")
			continue
		}
		cur.WriteString(line)
		full := cur.String()
		cur.Reset()
		cmd, args, _ := strings.Cut(full, " ")
		out = append(out, instruction{Cmd: strings.ToUpper(cmd), Args: strings.TrimSpace(args)})
	}
	if cur.Len() > 0 {
		return nil, fmt.Errorf("unterminated continuation line")
	}
	return out, sc.Err()
}

var argRef = regexp.MustCompile(`\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?`)

// checkDockerfile returns what the file lacks.
func checkDockerfile(data, binary, pkg string, nonRoot bool) []error {
	ins, err := parseDockerfile(data)
	if err != nil {
		return []error{err}
	}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	globalArgs := map[string]string{}
	var froms []string
	stage := -1
	var lastUser, entrypoint string
	labels := map[string]bool{}
	var buildRun string
	stageArgs := map[string]bool{}
	for _, in := range ins {
		switch in.Cmd {
		case "ARG":
			k, v, _ := strings.Cut(in.Args, "=")
			if stage < 0 {
				globalArgs[k] = v
			} else {
				stageArgs[k] = true
			}
		case "FROM":
			stage++
			froms = append(froms, in.Args)
			lastUser, entrypoint = "", ""
			labels = map[string]bool{}
		case "USER":
			lastUser = in.Args
		case "ENTRYPOINT":
			entrypoint = in.Args
		case "LABEL":
			for _, f := range strings.Fields(in.Args) {
				if k, _, ok := strings.Cut(f, "="); ok {
					labels[strings.Trim(k, `"`)] = true
				}
			}
		case "RUN":
			if strings.Contains(in.Args, "go build") {
				buildRun = in.Args
			}
		}
	}
	if len(froms) < 2 {
		bad("not multi-stage: %d FROM", len(froms))
		return errs
	}
	// Build stage: on the build platform, cross-compiling.
	if !strings.Contains(froms[0], "--platform=$BUILDPLATFORM") {
		bad("the build stage must run on --platform=$BUILDPLATFORM and cross-compile (no emulation)")
	}
	for _, a := range []string{"TARGETOS", "TARGETARCH"} {
		if !stageArgs[a] {
			bad("ARG %s is not declared in a stage", a)
		}
	}
	if !strings.Contains(buildRun, "GOOS=${TARGETOS}") && !strings.Contains(buildRun, "GOOS=$TARGETOS") {
		bad("go build does not set GOOS from TARGETOS")
	}
	if !strings.Contains(buildRun, "GOARCH=${TARGETARCH}") && !strings.Contains(buildRun, "GOARCH=$TARGETARCH") {
		bad("go build does not set GOARCH from TARGETARCH")
	}
	if !strings.Contains(buildRun, "CGO_ENABLED=0") {
		bad("go build without CGO_ENABLED=0: the binary would not be static")
	}
	if !strings.Contains(buildRun, pkg) {
		bad("go build does not build %s", pkg)
	}
	if !strings.Contains(buildRun, "github.com/apm-csi/apm-csi/shared/version.Version=") {
		bad("go build does not stamp shared/version.Version (as the Makefile does)")
	}
	// Every base image pinned (scratch has nothing to pin).
	for i, f := range froms {
		fields := strings.Fields(f)
		var image string
		for _, w := range fields {
			if !strings.HasPrefix(w, "--") {
				image = w
				break
			}
		}
		image = argRef.ReplaceAllStringFunc(image, func(ref string) string {
			return globalArgs[argRef.FindStringSubmatch(ref)[1]]
		})
		if image == "scratch" {
			continue
		}
		if err := imagePinnedOpts(image, name.WeakValidation); err != nil {
			bad("stage %d: base %v", i, err)
		}
	}
	// Final stage: labels, user, entrypoint.
	for _, l := range []string{"org.opencontainers.image.title", "org.opencontainers.image.source", "org.opencontainers.image.version", "org.opencontainers.image.revision"} {
		if !labels[l] {
			bad("final stage lacks LABEL %s", l)
		}
	}
	if nonRoot {
		u, _, _ := strings.Cut(lastUser, ":")
		if u == "" || u == "0" || u == "root" {
			bad("final stage must run as a non-root USER, got %q", lastUser)
		}
	}
	var ep []string
	if err := json.Unmarshal([]byte(entrypoint), &ep); err != nil || len(ep) == 0 || filepath.Base(ep[0]) != binary {
		bad("ENTRYPOINT %s must be the exec form running %s (the manifests pass only args)", entrypoint, binary)
	}
	return errs
}

func TestDockerfiles(t *testing.T) {
	root := repoRoot(t)
	for _, tc := range []struct {
		file, binary string
		nonRoot      bool
	}{
		{"Dockerfile.webhook", names.WebhookBinary, true},
		// The node plugin mounts into kubelet's pods dir: it runs as root, privileged.
		{"Dockerfile.node", names.NodeBinary, false},
	} {
		t.Run(tc.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(root, tc.file))
			if err != nil {
				testenv.Missing(t, "%v", err)
			}
			pkg := binaryPackages[tc.binary]
			if _, err := os.Stat(filepath.Join(root, pkg)); err != nil {
				t.Errorf("%s builds %s, which does not exist", tc.file, pkg)
			}
			report(t, checkDockerfile(string(data), tc.binary, pkg, tc.nonRoot))
		})
	}
	t.Run("catches", func(t *testing.T) {
		bad := "FROM golang:1.26 AS build\nRUN go build -o /x ./webhook/cmd/apm-csi-webhook\nFROM gcr.io/distroless/static\nENTRYPOINT /x\n"
		if errs := checkDockerfile(bad, names.WebhookBinary, binaryPackages[names.WebhookBinary], true); len(errs) < 8 {
			t.Fatalf("a bad Dockerfile passed most checks: %v", errs)
		}
	})
}
