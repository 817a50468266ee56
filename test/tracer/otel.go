package tracer

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/test/images"
)

// The OpenTelemetry operator's Node.js auto-instrumentation (its autoinstrumentation/nodejs
// directory): the image holds, under /autoinstrumentation, node_modules with
// @opentelemetry/api and @opentelemetry/auto-instrumentations-node (which brings the SDK and
// the instrumentations) and, copied next to it, the files of that package's build/src with
// autoinstrumentation.js, the entry point the operator's NODE_OPTIONS requires. The operator
// injects it with an emptyDir and an init container running cp -r /autoinstrumentation/. into it.
const (
	// OTelAPIVersion and OTelAutoVersion are the pinned npm releases (the operator's
	// package.json pins the same two packages).
	OTelAPIVersion  = "1.9.1"
	OTelAutoVersion = "0.78.0"
	// OTelSource is the directory of the image the operator's init container copies.
	OTelSource = "/autoinstrumentation"
	// OTelEntryPoint is the file, relative to OTelSource, NODE_OPTIONS requires.
	OTelEntryPoint = "autoinstrumentation.js"
	// OTelImagePackage is the repository name of the image in the test registry.
	OTelImagePackage = "autoinstrumentation-nodejs"
)

// otelRegisterDir is where auto-instrumentations-node keeps register.js and its helpers.
const otelRegisterDir = "node_modules/@opentelemetry/auto-instrumentations-node/build/src"

// InstallOTelNode installs @opentelemetry/api@OTelAPIVersion and
// @opentelemetry/auto-instrumentations-node@OTelAutoVersion with npm into
// <CacheDir>/tracer/otel-node-<auto>-<api> (once; later calls reuse it) and returns that
// directory. Install scripts are not run: the packages are plain JavaScript.
func InstallOTelNode(ctx context.Context, logf func(string, ...any)) (string, error) {
	return npmInstallation{
		name:      fmt.Sprintf("otel-node-%s-%s", OTelAutoVersion, OTelAPIVersion),
		tmpPrefix: ".otel-node-",
		project:   "apm-csi-otel-autoinstrumentation-nodejs",
		label:     "@opentelemetry/auto-instrumentations-node@" + OTelAutoVersion,
		packages:  []string{"@opentelemetry/api@" + OTelAPIVersion, "@opentelemetry/auto-instrumentations-node@" + OTelAutoVersion},
		check:     checkOTelNode,
	}.install(ctx, logf)
}

// checkOTelNode verifies an installation: the pinned versions and register.js.
func checkOTelNode(dir string) error {
	for pkg, want := range map[string]string{"@opentelemetry/api": OTelAPIVersion, "@opentelemetry/auto-instrumentations-node": OTelAutoVersion} {
		data, err := os.ReadFile(filepath.Join(dir, "node_modules", pkg, "package.json"))
		if err != nil {
			return err
		}
		var meta struct{ Version string }
		if err := json.Unmarshal(data, &meta); err != nil {
			return err
		}
		if meta.Version != want {
			return fmt.Errorf("%s %s installed, want %s", pkg, meta.Version, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, otelRegisterDir, "register.js")); err != nil {
		return fmt.Errorf("auto-instrumentations-node has no build/src/register.js, the operator's entry point: %w", err)
	}
	return nil
}

// OTelNodeImage returns the Node.js auto-instrumentation image in the operator's layout, from
// the installation in dir (see InstallOTelNode): a busybox userland (the operator's init
// container runs cp), /autoinstrumentation/node_modules and package.json, and the files of
// auto-instrumentations-node's build/src copied into /autoinstrumentation with
// autoinstrumentation.js a copy of register.js (the operator's image makes it a hard link).
// The image is built once per version pair and kept as a tarball in the cache.
func OTelNodeImage(ctx context.Context, dir string) (v1.Image, error) {
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	tag := OTelAutoVersion
	ref := "localhost/apm-csi/" + OTelImagePackage + ":" + tag
	file := filepath.Join(cache, "tracer", fmt.Sprintf("%s-%s-%s-f%s.tar", OTelImagePackage, OTelAutoVersion, OTelAPIVersion, imageFormat))
	return cachedImage(file, ref, func() (images.Spec, error) {
		files, busyboxVersion, err := images.BusyboxUserland(ctx, images.DebianBusybox)
		if err != nil {
			return images.Spec{}, err
		}
		mods, err := treeFiles(filepath.Join(dir, "node_modules"), path.Join(OTelSource, "node_modules"))
		if err != nil {
			return images.Spec{}, err
		}
		files = append(files, mods...)
		files = append(files, images.File{Path: path.Join(OTelSource, "package.json"), Source: filepath.Join(dir, "package.json")})
		entries, err := os.ReadDir(filepath.Join(dir, otelRegisterDir))
		if err != nil {
			return images.Spec{}, err
		}
		for _, e := range entries {
			if !e.Type().IsRegular() {
				continue
			}
			src := filepath.Join(dir, otelRegisterDir, e.Name())
			files = append(files, images.File{Path: path.Join(OTelSource, e.Name()), Source: src})
			if e.Name() == "register.js" {
				files = append(files, images.File{Path: path.Join(OTelSource, OTelEntryPoint), Source: src})
			}
		}
		return images.Spec{
			Ref:   ref,
			Files: files,
			Cmd:   []string{"/bin/sh"},
			Labels: map[string]string{
				images.LabelDescription: fmt.Sprintf("@opentelemetry/auto-instrumentations-node %s and @opentelemetry/api %s (npm) in the OpenTelemetry operator's Node.js layout, busybox %s", OTelAutoVersion, OTelAPIVersion, busyboxVersion),
				images.LabelVersion:     OTelAutoVersion,
				images.LabelLicenses:    "Apache-2.0",
			},
		}, nil
	})
}

// OTelTestEnv is the environment (KEY=value) under which the tests run an SDK outside a
// cluster: the service name and OTLP endpoint the operator would set, no metrics or logs, only
// the resource detectors that stay on the machine (the cloud detectors would probe metadata
// endpoints), and a short batch delay.
func OTelTestEnv(service, endpoint string) []string {
	return []string{
		"OTEL_SERVICE_NAME=" + service,
		"OTEL_EXPORTER_OTLP_ENDPOINT=" + endpoint,
		"OTEL_TRACES_EXPORTER=otlp",
		"OTEL_METRICS_EXPORTER=none",
		"OTEL_LOGS_EXPORTER=none",
		"OTEL_NODE_RESOURCE_DETECTORS=" + OTelLocalDetectors,
		"OTEL_BSP_SCHEDULE_DELAY=200",
	}
}

// OTelLocalDetectors are the Node.js resource detectors that read only the process and host.
const OTelLocalDetectors = "env,host,os,process"
