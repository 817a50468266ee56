package librarycache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/apm-csi/apm-csi/nodeplugin/librarycache/extract"
)

// maxLayerDownloads bounds the concurrent blob downloads of one image (within its download
// slot: slots.go counts images, not blobs).
const maxLayerDownloads = 4

// layerFiles downloads the compressed blobs of an image's layers (but the top one, which
// streams into the extractor) concurrently into a temp dir of the store, each verified against its digest and size as go-containerregistry reads it,
// while extraction reads them, in its own order, as soon as each is complete: downloads never
// wait for extraction, extraction waits only for the layer it needs next. Nothing is buffered
// in memory beyond copy buffers.
type layerFiles struct {
	s      *store
	dir    string
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	layers []*fileLayer
}

// fileLayer is a layer whose Compressed stream is its downloaded blob file.
type fileLayer struct {
	v1.Layer
	lf    *layerFiles
	file  string
	ready chan struct{}
	err   error
	// stream is set on the layer extraction reads first: it is read from the registry.
	stream bool
}

// prefetchLayers starts downloading layers, in the order extraction consumes them: mutate.Extract
// flattens from the top layer (the last) down, so the top layer is fetched first. The caller
// must call stop when done reading.
func (p *puller) prefetchLayers(ctx context.Context, layers []v1.Layer, maxBlob int64) (*layerFiles, error) {
	dir, err := p.store.mkTemp("layers")
	if err != nil {
		return nil, err
	}
	lf := &layerFiles{s: p.store, dir: dir}
	lf.ctx, lf.cancel = context.WithCancel(ctx)
	if len(layers) == 0 {
		return lf, nil
	}
	for i, l := range layers {
		size, err := l.Size()
		if err != nil {
			lf.stop()
			return nil, err
		}
		if size > maxBlob {
			lf.stop()
			d, _ := l.Digest()
			return nil, &extract.RejectedError{Reason: fmt.Sprintf("has a layer (%s) of %d compressed bytes, more than the %d bytes it may decompress to", d, size, maxBlob)}
		}
		lf.layers = append(lf.layers, &fileLayer{Layer: l, lf: lf, file: path.Join(dir, fmt.Sprintf("layer-%d", i)), ready: make(chan struct{})})
	}
	// The top layer is what extraction reads first: it streams from the registry into the
	// extractor as before, so a one-layer image is extracted while it downloads. The layers
	// below download to files meanwhile.
	top := lf.layers[len(lf.layers)-1]
	top.stream = true
	next := make(chan *fileLayer, len(layers))
	for i := len(lf.layers) - 2; i >= 0; i-- {
		next <- lf.layers[i]
	}
	close(next)
	for range min(len(layers)-1, maxLayerDownloads-1) {
		lf.wg.Add(1)
		go func() {
			defer lf.wg.Done()
			for l := range next {
				l.err = lf.download(l)
				close(l.ready)
			}
		}()
	}
	return lf, nil
}

// download copies one blob to its file. go-containerregistry verifies the digest and size at
// the end of the stream; a blob that fails either yields an error, never a file.
func (lf *layerFiles) download(l *fileLayer) error {
	if err := lf.ctx.Err(); err != nil {
		return err
	}
	rc, err := l.Layer.Compressed()
	if err != nil {
		return err
	}
	// Closing the body is what interrupts a blocked read when extraction gives up.
	stop := context.AfterFunc(lf.ctx, func() { _ = rc.Close() })
	defer func() {
		stop()
		_ = rc.Close()
	}()
	f, err := lf.s.root.OpenFile(l.file, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return localErr(err)
	}
	_, err = io.Copy(f, rc)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = localErr(cerr)
	}
	if err != nil && lf.ctx.Err() != nil {
		return errors.Join(err, lf.ctx.Err())
	}
	return err
}

// wrap returns the layers served from their files, in the image's order.
func (lf *layerFiles) wrap() []v1.Layer {
	out := make([]v1.Layer, len(lf.layers))
	for i, l := range lf.layers {
		out[i] = l
	}
	return out
}

// stop cancels the downloads still running, waits for them and removes the files.
func (lf *layerFiles) stop() {
	lf.cancel()
	lf.wg.Wait()
	if err := lf.s.root.RemoveAll(lf.dir); err != nil {
		lf.s.log.Error("cannot remove downloaded layer blobs; the next start removes them", "path", path.Join(lf.s.dir, lf.dir), "err", err)
	}
}

// Compressed waits for the blob's download and opens its file (or, for the layer extraction
// reads first, streams it from the registry).
func (l *fileLayer) Compressed() (io.ReadCloser, error) {
	if l.stream {
		return l.Layer.Compressed()
	}
	select {
	case <-l.ready:
	case <-l.lf.ctx.Done():
		return nil, l.lf.ctx.Err()
	}
	if l.err != nil {
		return nil, l.err
	}
	f, err := l.lf.s.root.Open(l.file)
	if err != nil {
		return nil, localErr(err)
	}
	return f, nil
}

// Uncompressed decodes the downloaded blob with the bounded decoders (decompress.go).
func (l *fileLayer) Uncompressed() (io.ReadCloser, error) {
	return boundedUncompressed(l)
}
