package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/apm-csi/apm-csi/nodeplugin/driver"
	"github.com/apm-csi/apm-csi/nodeplugin/hostdir"
	"github.com/apm-csi/apm-csi/nodeplugin/plugin"
	"github.com/apm-csi/apm-csi/nodeplugin/writablelayer"
	"github.com/apm-csi/apm-csi/shared/flagenv"
	"github.com/apm-csi/apm-csi/shared/names"
	"github.com/apm-csi/apm-csi/shared/volumeattrs"
)

// envPrefix: every flag can also be set as APM_CSI_<FLAG_NAME> (dashes become underscores).
// Repeatable flags take several values separated by ';' or newlines. A flag given on the
// command line wins over its variable.
const envPrefix = "APM_CSI_"

// options are the plugin's options plus what only the command uses.
type options struct {
	plugin.Options
	configFile string
	logLevel   slog.Level
	// What the flags hold before it is parsed and checked.
	hostDirFlags, socketFlags flagenv.Strings
	logLevelName              string
}

// sizeFlag parses a positive whole number of bytes written as a Kubernetes quantity.
type sizeFlag struct{ v *int64 }

func (f sizeFlag) String() string {
	if f.v == nil {
		return ""
	}
	return writablelayer.FormatBytes(*f.v)
}

func (f sizeFlag) Set(s string) error {
	q, err := resource.ParseQuantity(s)
	n := q.Value()
	if err != nil || n < volumeattrs.MinWritableLimit || q.Cmp(*resource.NewQuantity(n, resource.BinarySI)) != 0 {
		return fmt.Errorf("%q is not a size of at least 1Mi: use a quantity such as 256Mi or 1Gi", s)
	}
	*f.v = n
	return nil
}

// newFlagSet returns the node plugin's flags bound to o, with their defaults set.
func newFlagSet(o *options) *flag.FlagSet {
	fs := flag.NewFlagSet(names.NodeBinary, flag.ContinueOnError)
	fs.StringVar(&o.Endpoint, "endpoint", "", "CSI socket, unix:///path.sock; a stale socket left by a previous run is removed at start, anything else at that path is refused (default unix://<kubelet-dir>/plugins/<driver-name>/csi.sock)")
	fs.StringVar(&o.NodeID, "node-id", "", "node id reported to kubelet; set it from spec.nodeName (default the host name)")
	fs.StringVar(&o.DriverName, "driver-name", names.DriverName, "CSI driver name")
	fs.StringVar(&o.StateDir, "state-dir", "/var/lib/apm-csi", "host directory for all plugin state: volumes/journal (the records of published targets), store/ (the library cache, bind-mounted onto itself while the plugin runs), empty/ (the empty lower dir of read-only single-layer overlays, with an empty read-only tmpfs mounted on it while the plugin runs), overlays/ (per-volume upper/work dirs) and overlays-removing/ (released ones, removed in the background); must be a hostPath, not the container's overlay root filesystem")
	fs.StringVar(&o.KubeletDir, "kubelet-dir", "/var/lib/kubelet", "kubelet root directory (k0s, microk8s... differ); volumes are only ever mounted, and targets only ever removed, at <kubelet-dir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount, reached without following links")
	fs.Var(&o.hostDirFlags, "hostdir", "allowlisted host directory or file `ENTRY`, written "+hostdir.FlagSyntax+" (repeatable; also hostdirs in --config): ro: always mounted read-only; create: a missing PATH is created as a directory at publish time; namespaces (required): the namespaces whose pods may mount it, or * for every namespace; service-accounts: only pods running as one of these; namespace-selector: a label selector the namespace must match, checked by the webhook at admission")
	fs.Var(&o.socketFlags, "datadog-socket-entry", "which hostdir entry serves a Datadog socket volume type, `MAPPING` written TYPE=ENTRY; repeatable (defaults APMSocket=apm-socket, DSDSocket=dsd-socket, APMSocketDirectory=apm-socket-dir, DSDSocketDirectory=dsd-socket-dir)")
	fs.StringVar(&o.configFile, "config", "", "YAML or JSON `FILE` with hostdirs, datadogSockets, allowedRepositories and pullSecretScopes, in addition to the flags; flags override its socket mapping, the lists add up")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", ":9851", "address of the Prometheus /metrics endpoint; empty disables it")
	fs.StringVar(&o.HealthAddr, "health-addr", ":9850", "address of /healthz (calls Probe over the CSI socket, like the livenessprobe sidecar) and /readyz (ready once the start-up reconcile has read its records); empty disables it")
	fs.DurationVar(&o.PublishDownloadBudget, "publish-download-budget", driver.DefaultPublishDownloadBudget, "how long NodePublishVolume waits for a library download before answering Unavailable (kubelet retries; the download goes on in the background); kubelet's own deadline is about 2 minutes")
	fs.BoolVar(&o.KubeletRegistration, "kubelet-registration", true, "serve kubelet's plugin registration socket <kubelet-dir>/plugins_registry/<driver-name>-reg.sock; set false when a node-driver-registrar sidecar does it")
	fs.DurationVar(&o.DrainTimeout, "drain-timeout", 25*time.Second, "on SIGTERM, once the kubelet registration socket is gone, how long in-flight CSI calls may run before they are cancelled")
	fs.StringVar(&o.logLevelName, "log-level", "info", "debug, info, warn or error; logs are JSON on stderr")
	fs.DurationVar(&o.GCInterval, "gc-interval", time.Minute, "how often the library cache is garbage-collected (libraries unused for --gc-grace-period are removed)")
	o.WritableLayer = writablelayer.Auto
	o.DefaultWritableLayer, o.MaxWritableLayer = writablelayer.DefaultLimit, writablelayer.DefaultMaxLimit
	fs.Var(sizeFlag{&o.DefaultWritableLayer}, "default-writable-layer", "size limit of a writable library volume's private layer (upper and work dir) when the volume sets no writableLimit attribute (a quantity such as 256Mi)")
	fs.Var(sizeFlag{&o.MaxWritableLayer}, "max-writable-layer", "largest writableLimit a library volume may ask for (a quantity such as 1Gi); above it, publish fails with InvalidArgument naming both sizes and this flag")
	fs.BoolVar(&o.KeepWritableLayers, "keep-writable-layers", false, "keep a writable library volume's layer (what the pod wrote) across node reboots while its pod may exist, and mount it again when kubelet publishes the volume again; needs project-quota writable layers, and every unpublish then syncs the state dir's filesystem")
	fs.DurationVar(&o.KeptLayerGrace, "kept-writable-layer-grace", driver.DefaultKeptLayerGrace, "how long a kept writable layer stays after its pod's dir is gone from kubelet's pods dir (--keep-writable-layers)")
	fs.Var(sizeFlag{&o.MaxKeptWritable}, "max-kept-writable-bytes", "with --keep-writable-layers: the most all kept writable layers (of volumes not mounted now) may take together (a quantity such as 10Gi); the oldest go first; 0: no bound beyond each volume's limit")
	fs.Func("writable-layer-mechanism", "what enforces the writable layer limits: auto (project quotas where the state dir's ext4/xfs enforces them, else tmpfs), project-quota (refuse to start without them) or tmpfs (a size-limited tmpfs per volume) (default auto)", func(v string) error {
		m := writablelayer.Mechanism(v)
		if !slices.Contains(writablelayer.Mechanisms, m) {
			return fmt.Errorf("%q: use one of %v", v, writablelayer.Mechanisms)
		}
		o.WritableLayer = m
		return nil
	})
	o.Cache.AddFlags(fs)
	return fs
}

// parseArgsAndEnv parses args, then sets the flags not given from their variables.
func parseArgsAndEnv(fs *flag.FlagSet, args []string, getenv func(string) string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	return flagenv.Apply(fs, envPrefix, getenv)
}

// parseFlags reads args, then the environment for flags not given, then the config file.
func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := newFlagSet(o)
	fs.SetOutput(stderr)
	if err := parseArgsAndEnv(fs, args, getenv); err != nil {
		return nil, err
	}

	if err := o.logLevel.UnmarshalText([]byte(o.logLevelName)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	for _, dir := range []*string{&o.StateDir, &o.KubeletDir} {
		if !filepath.IsAbs(*dir) {
			return nil, fmt.Errorf("%q must be an absolute path", *dir)
		}
	}
	if o.PublishDownloadBudget <= 0 {
		return nil, fmt.Errorf("--publish-download-budget must be positive")
	}
	if o.GCInterval <= 0 {
		return nil, fmt.Errorf("--gc-interval must be positive")
	}
	if o.DefaultWritableLayer > o.MaxWritableLayer {
		return nil, fmt.Errorf("--default-writable-layer=%s is above --max-writable-layer=%s", writablelayer.FormatBytes(o.DefaultWritableLayer), writablelayer.FormatBytes(o.MaxWritableLayer))
	}
	o.Cache.StoreDir = filepath.Join(o.StateDir, "store")
	if o.Endpoint == "" {
		o.Endpoint = "unix://" + filepath.Join(o.KubeletDir, "plugins", o.DriverName, "csi.sock")
	}
	if o.NodeID == "" {
		host, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("--node-id not set and no host name: %w", err)
		}
		o.NodeID = host
	}

	o.DatadogSockets = map[string]string{}
	if o.configFile != "" {
		c, err := hostdir.LoadConfig(o.configFile)
		if err != nil {
			return nil, fmt.Errorf("--config %s: %w", o.configFile, err)
		}
		o.HostDirs = append(o.HostDirs, c.HostDirs...)
		o.Cache.AllowedRepositories = append(o.Cache.AllowedRepositories, c.AllowedRepositories...)
		o.Cache.PullSecretScopes = append(o.Cache.PullSecretScopes, c.PullSecretScopes...)
		for typ, entry := range c.DatadogSockets {
			o.DatadogSockets[typ] = entry
		}
	}
	for _, v := range o.hostDirFlags {
		e, err := hostdir.ParseEntry(v)
		if err != nil {
			return nil, fmt.Errorf("--hostdir: %w", err)
		}
		o.HostDirs = append(o.HostDirs, e)
	}
	// Flags override the config file's socket mapping.
	for _, v := range o.socketFlags {
		typ, entry, err := hostdir.ParseSocketMapping(v)
		if err != nil {
			return nil, fmt.Errorf("--datadog-socket-entry: %w", err)
		}
		o.DatadogSockets[typ] = entry
	}
	return o, nil
}
