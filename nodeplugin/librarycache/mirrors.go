package librarycache

import (
	"context"
	"errors"
	"fmt"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

// An archive that cannot be decompressed or parsed may be the image's fault (every location
// serves the same bytes) or the location's (a mirror or proxy serving wrong bytes for the
// digest). The digest check only completes at the end of a layer, after the decompressor
// gave up. So when reading the archive failed, each layer blob is read again and checked
// against its digest: a mismatch is a transfer failure (failCorrupt: the next location is
// tried, and a refusal is short-lived), a match means the content itself is broken.

// archiveReadFailed reports an extraction that failed while reading the archive itself
// (decompression, tar framing), not on a rule or the network.
func archiveReadFailed(err error) bool {
	var re *extract.ReadError
	return errors.As(err, &re) && classify(err) == failRejected
}

// verifyBlobs reads every layer blob of img to its end, so go-containerregistry checks its
// size and digest; the first failure is returned.
func verifyBlobs(ctx context.Context, img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		if err := ctx.Err(); err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, rc)
		_ = rc.Close()
		if err != nil {
			d, _ := l.Digest()
			return fmt.Errorf("layer %s: %w", d, err)
		}
	}
	return nil
}
