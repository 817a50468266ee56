package librarycache

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/clock"

	"github.com/apm-csi/apm-csi/shared/libref"
	"github.com/apm-csi/apm-csi/shared/repoallow"
)

// Defaults applied by AddFlags, and by New to zero fields.
const (
	DefaultTagTTL = 5 * time.Minute
	// DefaultMaxParallelDownloads is 8 so that the largest volume the webhook writes (one
	// image per language of libref.Languages, six, plus the injector: seven, all from one
	// registry) downloads all at once within the per-registry share of total-1 = 7, instead
	// of queueing behind a per-registry limit that registries themselves do not impose (a
	// container runtime pulling the same images as image volumes runs the pulls side by
	// side, each with a few layer connections). It stays a hard node-wide bound whatever
	// pods ask for (a volume holds at most 16 libraries): at most 8 images x 4 blob
	// connections (maxLayerDownloads), and memory of at most 8 bounded decoders (a zstd
	// window of at most 8 MiB each) plus copy buffers; layers below the top one are spooled
	// to files, not memory. One slot always stays free for another registry, so a volume
	// from a slow registry cannot hold every slot.
	DefaultMaxParallelDownloads = 8
	DefaultMaxLibraryBytes      = 2 << 30
	DefaultMaxLibraryFiles      = 200_000
	DefaultGCGracePeriod        = time.Hour
	DefaultDownloadTimeout      = 15 * time.Minute
	// DefaultDiskBudgetPercent is the disk budget, as a share of the size of the filesystem
	// holding the store, when no budget in bytes is set.
	DefaultDiskBudgetPercent = 20
	// DefaultDownloadSlotWait bounds the wait for a download slot, well under kubelet's
	// publish deadline so the pod's events say why.
	DefaultDownloadSlotWait = 20 * time.Second
	// DefaultMinDownloadRate and DefaultMinDownloadRateWindow: a download that receives less
	// than 16 KiB/s over 30 s is aborted, freeing its slot.
	DefaultMinDownloadRate       = 16 << 10
	DefaultMinDownloadRateWindow = 30 * time.Second
	// DefaultMaxParallelResolutions bounds concurrent tag resolutions.
	DefaultMaxParallelResolutions = 4
)

// Config configures a Cache. Zero values take the defaults above, so a zero duration can
// never mean "remove at once" by accident: use a tiny duration for that.
type Config struct {
	// StoreDir holds the cache: <state-dir>/store. It must be a host directory (not an
	// overlayfs) on one filesystem, since entries are renamed into place and views are
	// hardlink farms.
	StoreDir string
	// Mirrors are tried in order before the registry they mirror; the source is the fallback.
	Mirrors []Mirror
	// PullSecretDir holds mounted kubernetes.io/dockerconfigjson (or dockercfg) secrets, one
	// per subdirectory or directly; read at every pull, so rotated secrets apply at once.
	// Combined with the node's docker config (authn.DefaultKeychain).
	PullSecretDir string
	// InsecureRegistries (host:port) are reached over plain HTTP.
	InsecureRegistries []string
	// TagTTL is how long a tag's resolved digest is trusted before the registry is asked again.
	TagTTL time.Duration
	// MaxParallelDownloads bounds concurrent downloads of different images.
	MaxParallelDownloads int
	// MaxDownloadsPerRegistry bounds concurrent downloads from one registry host (the first
	// location tried: a mirror if one matches), so one slow registry cannot take every slot.
	// Default and upper bound: MaxParallelDownloads-1 (1 when only one download is allowed).
	MaxDownloadsPerRegistry int
	// DownloadSlotWait bounds how long a download waits for a slot before failing with
	// library.ErrDownloadSlotsBusy (kubelet retries the mount).
	DownloadSlotWait time.Duration
	// MinDownloadRate (bytes per second) over MinDownloadRateWindow: a download receiving
	// less is aborted. Negative disables the check.
	MinDownloadRate       int64
	MinDownloadRateWindow time.Duration
	// MaxParallelResolutions bounds concurrent tag resolutions (manifest requests).
	MaxParallelResolutions int
	// MaxLibraryBytes and MaxLibraryFiles cap one image's extracted size and entry count.
	MaxLibraryBytes int64
	MaxLibraryFiles int
	// GCGracePeriod is how long an entry no volume uses is kept.
	GCGracePeriod time.Duration
	// DiskBudget makes GC evict least recently used unreferenced libraries until the cache
	// fits, and new downloads wait (library.ErrCacheFull) while it is exceeded. Zero means
	// DiskBudgetPercent of the size of the filesystem holding StoreDir.
	DiskBudget        int64
	DiskBudgetPercent int
	// Clock is where the cache reads time: tag TTLs and the wait for a tag's revalidation,
	// GC grace periods and ages, last uses, download slot waits, the minimum download rate,
	// flush waits, rejection expiry, the store lock wait and the durations it logs. Default:
	// the real clock.
	Clock clock.Clock
	// Prefetch lists image references pulled at Start and kept while configured.
	Prefetch []string
	// DownloadTimeout bounds one background download, so a stalled connection cannot hold a
	// library "in progress" forever.
	DownloadTimeout time.Duration
	Logger          *slog.Logger
	// Registerer receives the metrics: the binary passes controller-runtime's
	// metrics.Registry; nil leaves them unregistered (tests).
	Registerer prometheus.Registerer
	// Keychain replaces the keychain built from PullSecretDir and the node's docker config.
	Keychain authn.Keychain
	// Platform replaces the node's platform (linux/GOARCH).
	Platform *v1.Platform
	// AllowedRepositories are the registries and repository prefixes library images may come
	// from (allow.go). Empty: libref.DefaultRegistry. Every mirror's source is always added.
	AllowedRepositories []string
	// PullSecretScopes restrict pull secrets (by the name of their directory in
	// PullSecretDir) to repository prefixes and namespaces (credentials.go).
	PullSecretScopes []repoallow.SecretScope
}

// Mirror redirects pulls of a registry or repository prefix to another location.
type Mirror struct {
	// Source is a registry ("docker.io") or repository prefix ("gcr.io/datadoghq").
	Source string
	// Mirror is where the same repositories live: "mirror.example:5000" or
	// "mirror.example:5000/datadog".
	Mirror string
}

// ParseMirror parses SRC=MIRROR.
func ParseMirror(s string) (Mirror, error) {
	src, mirror, ok := strings.Cut(s, "=")
	if !ok || src == "" || mirror == "" {
		return Mirror{}, fmt.Errorf("registry mirror %q: want SOURCE=MIRROR, e.g. gcr.io/datadoghq=mirror.example:5000/datadoghq", s)
	}
	m := Mirror{Source: normalizePrefix(src), Mirror: strings.TrimSuffix(mirror, "/")}
	if m.Source == "" {
		return Mirror{}, fmt.Errorf("registry mirror %q: invalid source %q: want a registry host (gcr.io) or repository prefix (gcr.io/datadoghq)", s, src)
	}
	if _, err := name.NewRepository(m.Mirror+"/x", name.WeakValidation); err != nil {
		return Mirror{}, fmt.Errorf("registry mirror %q: invalid mirror %q: %v", s, mirror, err)
	}
	return m, nil
}

// normalizePrefix canonicalises a registry or repository prefix the way go-containerregistry
// canonicalises repositories (docker.io becomes index.docker.io), so prefixes compare. The
// first component must be a registry host; "" means invalid.
func normalizePrefix(s string) string {
	host, rest, _ := strings.Cut(strings.Trim(s, "/"), "/")
	if !strings.ContainsAny(host, ".:") && host != "localhost" {
		return ""
	}
	r, err := name.NewRegistry(host, name.WeakValidation)
	if err != nil {
		return ""
	}
	if rest == "" {
		return r.Name()
	}
	if _, err := name.NewRepository(r.Name()+"/"+rest, name.WeakValidation); err != nil {
		return ""
	}
	return r.Name() + "/" + rest
}

// rewrite returns repo served from the mirror, or false if the mirror does not cover repo.
func (m Mirror) rewrite(repo string) (string, bool) {
	rest, ok := strings.CutPrefix(repo, m.Source)
	if !ok || rest != "" && !strings.HasPrefix(rest, "/") {
		return "", false
	}
	return m.Mirror + rest, true
}

// AddFlags binds the cache's flags to c, with the defaults set. StoreDir, Logger and
// Registerer are the caller's to fill.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	repeatableFlag(fs, "registry-mirror", "SOURCE=MIRROR: pull images of the registry or repository prefix SOURCE from MIRROR first, falling back to SOURCE (repeatable), e.g. gcr.io/datadoghq=mirror.example:5000/datadoghq", func(s string) error {
		m, err := ParseMirror(s)
		if err != nil {
			return err
		}
		c.Mirrors = append(c.Mirrors, m)
		return nil
	})
	fs.StringVar(&c.PullSecretDir, "pull-secret-dir", c.PullSecretDir, "directory of mounted kubernetes.io/dockerconfigjson secrets used to pull library images, in addition to the node's docker config")
	repeatableFlag(fs, "insecure-registry", "HOST:PORT of a registry reached over plain HTTP (repeatable)", func(s string) error {
		if _, err := name.NewRegistry(s, name.StrictValidation); err != nil {
			return fmt.Errorf("insecure registry %q: %v", s, err)
		}
		c.InsecureRegistries = append(c.InsecureRegistries, s)
		return nil
	})
	c.TagTTL = orDefault(c.TagTTL, DefaultTagTTL)
	fs.DurationVar(&c.TagTTL, "tag-ttl", c.TagTTL, "how long a tag's resolved digest is used before asking the registry again")
	c.MaxParallelDownloads = orDefault(c.MaxParallelDownloads, DefaultMaxParallelDownloads)
	fs.IntVar(&c.MaxParallelDownloads, "max-parallel-downloads", c.MaxParallelDownloads, "library images downloaded at the same time")
	c.MaxLibraryBytes = orDefault(c.MaxLibraryBytes, DefaultMaxLibraryBytes)
	fs.Var(quantityFlag{&c.MaxLibraryBytes}, "max-library-bytes", "largest extracted size of one library image (bytes, or a quantity such as 2Gi); larger images are rejected")
	c.MaxLibraryFiles = orDefault(c.MaxLibraryFiles, DefaultMaxLibraryFiles)
	fs.IntVar(&c.MaxLibraryFiles, "max-library-files", c.MaxLibraryFiles, "largest number of entries in one library image; larger images are rejected")
	c.GCGracePeriod = orDefault(c.GCGracePeriod, DefaultGCGracePeriod)
	fs.DurationVar(&c.GCGracePeriod, "gc-grace-period", c.GCGracePeriod, "how long a cached library that no volume uses is kept")
	c.DiskBudgetPercent = orDefault(c.DiskBudgetPercent, DefaultDiskBudgetPercent)
	fs.Var(budgetFlag{c}, "cache-disk-budget", "disk the library cache may use, in bytes (20Gi) or as a share of the store's filesystem (20%); over it, least recently used unreferenced libraries are evicted and new downloads wait")
	fs.IntVar(&c.MaxDownloadsPerRegistry, "max-downloads-per-registry", 0, "library images downloaded at the same time from one registry host (default and at most: --max-parallel-downloads minus one)")
	c.DownloadSlotWait = orDefault(c.DownloadSlotWait, DefaultDownloadSlotWait)
	fs.DurationVar(&c.DownloadSlotWait, "download-slot-wait", c.DownloadSlotWait, "longest wait for a download slot; then the mount fails with Unavailable naming the busy registries, and kubelet retries")
	c.MinDownloadRate = orDefault(c.MinDownloadRate, DefaultMinDownloadRate)
	fs.Func("min-download-rate", "abort a download that receives fewer bytes per second than this over --min-download-rate-window (a quantity such as 16Ki; 0 disables) (default 16Ki)", func(s string) error {
		var v int64
		if err := (quantityFlag{&v}).Set(s); err != nil {
			return err
		}
		c.MinDownloadRate = v
		if v == 0 {
			c.MinDownloadRate = -1
		}
		return nil
	})
	c.MinDownloadRateWindow = orDefault(c.MinDownloadRateWindow, DefaultMinDownloadRateWindow)
	fs.DurationVar(&c.MinDownloadRateWindow, "min-download-rate-window", c.MinDownloadRateWindow, "window over which --min-download-rate is measured")
	repeatableFlag(fs, "prefetch", "image reference pulled at start so the first pod on a new node does not wait (repeatable)", func(s string) error {
		if _, err := libref.Parse(s); err != nil {
			return err
		}
		c.Prefetch = append(c.Prefetch, s)
		return nil
	})
	c.addTrustFlags(fs)
	c.DownloadTimeout = orDefault(c.DownloadTimeout, DefaultDownloadTimeout)
	fs.DurationVar(&c.DownloadTimeout, "download-timeout", c.DownloadTimeout, "longest time one library download may take in the background")
}

// repeatableFlag defines a flag given once per value, like fs.Func. Its value declares itself
// repeatable, so the command's environment parser (flagenv) splits one variable into values.
func repeatableFlag(fs *flag.FlagSet, name, usage string, set func(string) error) {
	fs.Var(repeatableFunc(set), name, usage)
}

type repeatableFunc func(string) error

func (f repeatableFunc) Set(s string) error { return f(s) }
func (repeatableFunc) String() string       { return "" }
func (repeatableFunc) IsRepeatable() bool   { return true }

// defaultPerRegistry leaves one download slot to other registries.
func defaultPerRegistry(total int) int {
	return max(1, total-1)
}

// budgetFlag parses --cache-disk-budget: bytes (a quantity) or a percentage of the store's
// filesystem.
type budgetFlag struct{ c *Config }

func (b budgetFlag) String() string {
	if b.c == nil {
		return ""
	}
	if b.c.DiskBudget > 0 {
		return quantityFlag{&b.c.DiskBudget}.String()
	}
	return fmt.Sprintf("%d%%", orDefault(b.c.DiskBudgetPercent, DefaultDiskBudgetPercent))
}

func (b budgetFlag) Set(s string) error {
	if p, ok := strings.CutSuffix(s, "%"); ok {
		var n int
		if _, err := fmt.Sscanf(p, "%d", &n); err != nil || n < 1 || n > 100 || fmt.Sprint(n) != p {
			return fmt.Errorf("%q: a share of the filesystem must be a whole percentage from 1%% to 100%%", s)
		}
		b.c.DiskBudget, b.c.DiskBudgetPercent = 0, n
		return nil
	}
	var v int64
	if err := (quantityFlag{&v}).Set(s); err != nil {
		return err
	}
	if v == 0 {
		return fmt.Errorf("%q: the disk budget must be positive (bytes such as 20Gi, or a share such as 20%%)", s)
	}
	b.c.DiskBudget = v
	return nil
}

// quantityFlag parses byte sizes as Kubernetes quantities ("500Mi", "2Gi", "1073741824").
type quantityFlag struct{ v *int64 }

func (q quantityFlag) String() string {
	if q.v == nil || *q.v == 0 {
		return "0"
	}
	return resource.NewQuantity(*q.v, resource.BinarySI).String()
}

func (q quantityFlag) Set(s string) error {
	v, err := resource.ParseQuantity(s)
	if err != nil {
		return fmt.Errorf("%q is not a size: use bytes or a quantity such as 500Mi or 2Gi", s)
	}
	if v.Sign() < 0 {
		return fmt.Errorf("%q: size must not be negative", s)
	}
	*q.v = v.Value()
	return nil
}

func orDefault[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

// withDefaults validates c and fills zero fields.
func (c Config) withDefaults() (Config, error) {
	if c.StoreDir == "" || !filepath.IsAbs(c.StoreDir) {
		return c, fmt.Errorf("library cache store dir %q must be an absolute path (<state-dir>/store)", c.StoreDir)
	}
	c.StoreDir = filepath.Clean(c.StoreDir)
	c.TagTTL = orDefault(c.TagTTL, DefaultTagTTL)
	c.MaxParallelDownloads = orDefault(c.MaxParallelDownloads, DefaultMaxParallelDownloads)
	c.MaxLibraryBytes = orDefault(c.MaxLibraryBytes, DefaultMaxLibraryBytes)
	c.MaxLibraryFiles = orDefault(c.MaxLibraryFiles, DefaultMaxLibraryFiles)
	c.GCGracePeriod = orDefault(c.GCGracePeriod, DefaultGCGracePeriod)
	c.DownloadTimeout = orDefault(c.DownloadTimeout, DefaultDownloadTimeout)
	c.DiskBudgetPercent = orDefault(c.DiskBudgetPercent, DefaultDiskBudgetPercent)
	c.MaxDownloadsPerRegistry = orDefault(c.MaxDownloadsPerRegistry, defaultPerRegistry(c.MaxParallelDownloads))
	if c.MaxParallelDownloads > 1 {
		// One registry never holds every slot.
		c.MaxDownloadsPerRegistry = min(c.MaxDownloadsPerRegistry, c.MaxParallelDownloads-1)
	}
	c.DownloadSlotWait = orDefault(c.DownloadSlotWait, DefaultDownloadSlotWait)
	c.MinDownloadRate = orDefault(c.MinDownloadRate, DefaultMinDownloadRate)
	c.MinDownloadRateWindow = orDefault(c.MinDownloadRateWindow, DefaultMinDownloadRateWindow)
	c.MaxParallelResolutions = orDefault(c.MaxParallelResolutions, DefaultMaxParallelResolutions)
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	var errs []error
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"tag TTL", c.TagTTL}, {"GC grace period", c.GCGracePeriod}, {"download timeout", c.DownloadTimeout}} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s %v must not be negative", d.name, d.v))
		}
	}
	if c.MaxParallelDownloads < 0 || c.MaxLibraryBytes < 0 || c.MaxLibraryFiles < 0 || c.DiskBudget < 0 || c.MaxDownloadsPerRegistry < 0 || c.MaxParallelResolutions < 0 {
		errs = append(errs, errors.New("download parallelism, library size and file limits and the disk budget must not be negative"))
	}
	if c.DiskBudgetPercent < 0 || c.DiskBudgetPercent > 100 {
		errs = append(errs, fmt.Errorf("disk budget share %d%% must be between 1%% and 100%%", c.DiskBudgetPercent))
	}
	if c.DownloadSlotWait < 0 || c.MinDownloadRateWindow < 0 {
		errs = append(errs, errors.New("the download slot wait and the minimum download rate window must not be negative"))
	}
	c.Mirrors = slices.Clone(c.Mirrors)
	for i, m := range c.Mirrors {
		c.Mirrors[i].Source = normalizePrefix(m.Source)
		if c.Mirrors[i].Source == "" || m.Mirror == "" {
			errs = append(errs, fmt.Errorf("registry mirror %q=%q: want a registry host or repository prefix and a mirror location", m.Source, m.Mirror))
		}
	}
	for _, p := range c.Prefetch {
		if _, err := libref.Parse(p); err != nil {
			errs = append(errs, fmt.Errorf("prefetch: %w", err))
		}
	}
	errs = append(errs, c.validateTrust())
	return c, errors.Join(errs...)
}
