// Command localcluster starts and stops the local single-node Kubernetes cluster (see
// docs/local-cluster.md). It needs root.
//
//	localcluster up [flags]         start a cluster; returns when the node is Ready
//	localcluster down [flags]       stop it and remove everything it created
//	localcluster status [flags]     component processes, API health, node readiness
//	localcluster kubeconfig [flags] print the admin kubeconfig path
//	localcluster import [flags] TARBALL...  import image tarballs into containerd
//	localcluster apply [flags] PATH...      kubectl apply -f/-k
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/apm-csi/apm-csi/test/localcluster"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:])
	var perr parseError
	switch {
	case err == nil:
	case errors.Is(err, flag.ErrHelp):
		// -h: the flag set printed the usage.
		os.Exit(0)
	case errors.As(err, &perr):
		// The flag set printed the error and the usage.
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "localcluster:", err)
		os.Exit(1)
	}
}

// parseError is a command line that a command's flag set refused; the flag set printed why,
// with the usage.
type parseError struct{ err error }

func (e parseError) Error() string { return e.err.Error() }
func (e parseError) Unwrap() error { return e.err }

const usage = "usage: localcluster up|down|status|kubeconfig|import|apply [flags] (-h for each)"

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New(usage)
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	parse := func() error {
		if err := fs.Parse(args); err != nil {
			return parseError{err}
		}
		return nil
	}
	root := fs.String("root", envOr("APM_CSI_CLUSTER_ROOT", localcluster.DefaultRoot), "directory holding all cluster state (env APM_CSI_CLUSTER_ROOT)")
	logf := func(format string, a ...any) {
		fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
	}
	switch cmd {
	case "up":
		opts := localcluster.Options{Logf: logf}
		fs.StringVar(&opts.KubeletDir, "kubelet-dir", "", "kubelet --root-dir (default <root>/kubelet)")
		fs.StringVar(&opts.NodeName, "node-name", localcluster.DefaultNodeName, "node name")
		fs.StringVar(&opts.PodCIDR, "pod-cidr", localcluster.DefaultPodCIDR, "pod bridge range (private, not routed on this host)")
		fs.StringVar(&opts.ServiceCIDR, "service-cidr", localcluster.DefaultServiceCIDR, "ClusterIP range")
		fs.StringVar(&opts.RegistryAddr, "registry-addr", localcluster.DefaultRegistryAddr, "loopback address of the library image registry")
		fs.DurationVar(&opts.ReadyTimeout, "timeout", localcluster.DefaultReadyTimeout, "timeout of each readiness wait")
		fs.BoolVar(&opts.KeepOnFailure, "keep-on-failure", false, "leave processes running when up fails, for inspection")
		if err := parse(); err != nil {
			return err
		}
		opts.Root = *root
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		// The registry must outlive this command: run it as a detached copy of this program.
		opts.RegistryExecutable = exe
		start := time.Now()
		c, err := localcluster.Up(ctx, opts)
		if err != nil {
			return err
		}
		fmt.Printf("cluster up in %s\n", time.Since(start).Round(100*time.Millisecond))
		printInfo(c)
		return nil
	case "down":
		drain := fs.Duration("drain-timeout", localcluster.DefaultDrainTimeout, "how long the kubelet may take to delete pods before everything is stopped forcibly")
		purge := fs.Bool("purge", false, "also remove the root directory (image store, logs, certificates)")
		if err := parse(); err != nil {
			return err
		}
		start := time.Now()
		if err := localcluster.Down(ctx, localcluster.Options{Root: *root, DrainTimeout: *drain, Logf: logf}); err != nil {
			return err
		}
		if *purge {
			if err := os.RemoveAll(*root); err != nil {
				return err
			}
		}
		fmt.Printf("cluster down in %s\n", time.Since(start).Round(100*time.Millisecond))
		return nil
	case "status":
		if err := parse(); err != nil {
			return err
		}
		return status(ctx, *root)
	case "kubeconfig":
		if err := parse(); err != nil {
			return err
		}
		c, err := localcluster.Attach(*root)
		if err != nil {
			return fmt.Errorf("no cluster under %s: %w", *root, err)
		}
		fmt.Println(c.Kubeconfig())
		return nil
	case "import":
		if err := parse(); err != nil {
			return err
		}
		c, err := localcluster.Attach(*root)
		if err != nil {
			return fmt.Errorf("no cluster under %s: %w", *root, err)
		}
		for _, tarball := range fs.Args() {
			if err := c.ImportImage(ctx, tarball); err != nil {
				return err
			}
			fmt.Println("imported", tarball)
		}
		return nil
	case "apply":
		if err := parse(); err != nil {
			return err
		}
		c, err := localcluster.Attach(*root)
		if err != nil {
			return fmt.Errorf("no cluster under %s: %w", *root, err)
		}
		for _, path := range fs.Args() {
			out, err := c.Apply(ctx, path)
			fmt.Print(out)
			if err != nil {
				return err
			}
		}
		return nil
	case "serve-registry":
		// Run detached by `up`; not meant to be called by hand.
		addr := fs.String("addr", localcluster.DefaultRegistryAddr, "loopback listen address")
		dir := fs.String("dir", "", "blob directory")
		if err := parse(); err != nil {
			return err
		}
		if *dir == "" {
			return errors.New("serve-registry needs --dir")
		}
		return localcluster.ServeRegistry(ctx, *addr, *dir, log.New(os.Stderr, "", log.LstdFlags))
	default:
		return fmt.Errorf("unknown command %q; %s", cmd, usage)
	}
}

func printInfo(c *localcluster.Cluster) {
	fmt.Printf("kubeconfig:   %s\n", c.Kubeconfig())
	fmt.Printf("api server:   %s\n", c.APIServerURL())
	fmt.Printf("node:         %s (%s)\n", c.NodeName(), c.NodeIP())
	fmt.Printf("kubelet dir:  %s\n", c.KubeletDir())
	fmt.Printf("registry:     %s\n", c.RegistryAddr())
	fmt.Printf("containerd:   %s\n", c.ContainerdAddress())
	fmt.Printf("kubectl:      %s\n", filepath.Join(c.BinDir(), "kubectl"))
	fmt.Printf("logs:         %s\n", filepath.Dir(c.LogPath("kubelet")))
}

func status(ctx context.Context, root string) error {
	c, err := localcluster.Attach(root)
	if err != nil {
		fmt.Printf("no cluster recorded under %s\n", root)
		return nil
	}
	printInfo(c)
	fmt.Println()
	for _, st := range c.Status() {
		state := "stopped"
		if st.Running {
			state = fmt.Sprintf("running (pid %d)", st.PID)
		}
		fmt.Printf("%-24s %s\n", st.Component, state)
	}
	healthy := c.Healthy(ctx)
	fmt.Printf("%-24s %v\n", "healthy", healthy)
	if !healthy {
		return nil
	}
	cs, err := c.Clientset()
	if err != nil {
		return err
	}
	node, err := cs.CoreV1().Nodes().Get(ctx, c.NodeName(), metav1.GetOptions{})
	if err != nil {
		return err
	}
	for _, cond := range node.Status.Conditions {
		if cond.Type == "Ready" {
			fmt.Printf("%-24s %s (%s)\n", "node Ready", cond.Status, cond.Reason)
		}
	}
	return nil
}

func envOr(key, fallback string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return fallback
}
