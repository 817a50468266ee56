package localcluster

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"
)

// RestartKubelet stops the kubelet (SIGTERM, SIGKILL after the usual grace) and starts it
// again with the same command line, as an upgrade or a crash of the node agent would; running
// containers are left alone. It returns once the new kubelet's health endpoint answers. The
// previous kubelet's log is kept as kubelet.previous.log.
func (c *Cluster) RestartKubelet(ctx context.Context) error {
	o := c.opts
	rec, err := o.readProcessRecord(compKubelet)
	if err != nil {
		return fmt.Errorf("no kubelet recorded under %s: %w", o.Root, err)
	}
	if len(rec.Args) == 0 {
		return errors.New("the kubelet's recorded command line is empty")
	}
	if err := o.stopProcess(compKubelet, stopGrace(compKubelet)); err != nil {
		return err
	}
	_ = os.Rename(o.LogPath(compKubelet), o.LogPath(compKubelet+".previous"))
	if _, err := o.startProcess(compKubelet, rec.Args[0], rec.Args[1:]...); err != nil {
		return err
	}
	client := &http.Client{Timeout: 2 * time.Second}
	return o.waitComponent(ctx, compKubelet, func(ctx context.Context) (bool, error) {
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", kubeletHealthzPort))
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}
