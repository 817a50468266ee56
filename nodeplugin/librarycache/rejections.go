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

// loadRejections reads the rejections still in force into p.rejected.
func (p *puller) loadRejections() {
	b, err := p.store.root.ReadFile(rejectionsFile)
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	if err != nil {
		p.log.Warn("cannot read remembered image rejections; rejected images will be downloaded again", "err", err)
		return
	}
	var recs map[string]rejectionRecord
	if err := json.Unmarshal(b, &recs); err != nil {
		p.log.Warn("ignoring a corrupt rejections file", "path", path.Join(p.store.dir, rejectionsFile), "err", err)
		return
	}
	now := p.clock.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for digest, r := range recs {
		if r.Until.After(now) && r.Message != "" {
			p.rejected[digest] = rejection{err: &rememberedRejection{msg: r.Message}, until: r.Until}
		}
	}
}

// rememberRejection records that the image digest was rejected, in memory and on disk.
func (p *puller) rememberRejection(digest string, err error) {
	now := p.clock.Now()
	p.mu.Lock()
	p.rejected[digest] = rejection{err: err, until: now.Add(rejectionTTL)}
	recs := map[string]rejectionRecord{}
	for d, r := range p.rejected {
		if r.until.After(now) {
			recs[d] = rejectionRecord{Message: r.err.Error(), Until: r.until.UTC()}
		} else {
			delete(p.rejected, d)
		}
	}
	p.mu.Unlock()
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
		merr = p.store.writeFileAtomic(rejectionsFile, b)
	}
	if merr != nil {
		p.log.Warn("cannot remember an image rejection on disk; after a restart the image is downloaded again", "digest", digest, "err", merr)
	}
}

// writeFileAtomic replaces the store file rel (written beside in tmp/, then renamed).
func (s *store) writeFileAtomic(rel string, b []byte) error {
	tmp, err := s.mkTemp("file")
	if err != nil {
		return err
	}
	p := path.Join(tmp, path.Base(rel))
	if err := s.root.WriteFile(p, b, 0o600); err != nil {
		_ = s.root.RemoveAll(tmp)
		return err
	}
	err = s.root.Rename(p, rel)
	_ = s.root.RemoveAll(tmp)
	return err
}
