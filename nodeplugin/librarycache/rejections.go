package librarycache

import (
	"encoding/json"
	"errors"
	"io/fs"
	"path"
	"time"

	"github.com/apm-csi/apm-csi/nodeplugin/library"
)

// rejectionsFile remembers rejected images across restarts: a hostile image that makes the
// plugin fail hard (or that a crash loop would download again at every start) is refused
// from this record until its rejection expires.
const rejectionsFile = "rejections.json"

// maxRememberedRejections bounds the file; the oldest expire first.
const maxRememberedRejections = 1000

type rejectionRecord struct {
	Message string    `json:"message"`
	Until   time.Time `json:"until"`
}

// rememberedRejection is a rejection read back from disk: the message of the original error,
// still an ErrImageRejected.
type rememberedRejection struct{ msg string }

func (e *rememberedRejection) Error() string        { return e.msg }
func (e *rememberedRejection) Is(target error) bool { return target == library.ErrImageRejected }

// loadRejectionsLocked reads the rejections still in force into c.rejected.
func (c *Cache) loadRejections() {
	b, err := c.root.ReadFile(rejectionsFile)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil {
		c.log.Warn("cannot read remembered image rejections; rejected images will be downloaded again", "error", err)
		return
	}
	var recs map[string]rejectionRecord
	if err := json.Unmarshal(b, &recs); err != nil {
		c.log.Warn("ignoring a corrupt rejections file", "path", path.Join(c.dir, rejectionsFile), "error", err)
		return
	}
	now := c.clock.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	for digest, r := range recs {
		if r.Until.After(now) && r.Message != "" {
			c.rejected[digest] = rejection{err: &rememberedRejection{msg: r.Message}, until: r.Until}
		}
	}
}

// rememberRejection records that the image digest was rejected, in memory and on disk.
func (c *Cache) rememberRejection(digest string, err error) {
	now := c.clock.Now()
	c.mu.Lock()
	c.rejected[digest] = rejection{err: err, until: now.Add(rejectionTTL)}
	recs := map[string]rejectionRecord{}
	for d, r := range c.rejected {
		if r.until.After(now) {
			recs[d] = rejectionRecord{Message: r.err.Error(), Until: r.until.UTC()}
		} else {
			delete(c.rejected, d)
		}
	}
	c.mu.Unlock()
	for len(recs) > maxRememberedRejections {
		var oldest string
		for d, r := range recs {
			if oldest == "" || r.Until.Before(recs[oldest].Until) {
				oldest = d
			}
		}
		delete(recs, oldest)
	}
	b, merr := json.Marshal(recs)
	if merr == nil {
		merr = c.writeFileAtomic(rejectionsFile, b)
	}
	if merr != nil {
		c.log.Warn("cannot remember an image rejection on disk; after a restart the image is downloaded again", "digest", digest, "error", merr)
	}
}

// writeFileAtomic replaces the store file rel (written beside in tmp/, then renamed).
func (c *Cache) writeFileAtomic(rel string, b []byte) error {
	tmp, err := c.mkTemp("file")
	if err != nil {
		return err
	}
	p := path.Join(tmp, path.Base(rel))
	if err := c.root.WriteFile(p, b, 0o600); err != nil {
		_ = c.root.RemoveAll(tmp)
		return err
	}
	err = c.root.Rename(p, rel)
	_ = c.root.RemoveAll(tmp)
	return err
}
