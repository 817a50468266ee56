package driver

import (
	"sync"

	"golang.org/x/sys/unix"
)

// lateCloseBacklog bounds the descriptors waiting to be closed; past it, close is done in the
// call, so a slow disk slows calls down instead of exhausting the process's descriptors.
const lateCloseBacklog = 1024

// lateCloser closes file descriptors in the background, one at a time.
//
// Removing a directory that the plugin still holds open only unlinks it: the name is gone at
// once, and the kernel frees the directory's block at the last close. Freeing it is what
// waits for the disk: on ext4 mounted with online discard, while another process writes to
// the same disk, a plain rmdir takes 2-5 ms (tens at the tail), and unlinking a directory that
// is held open takes microseconds. So an unpublish removes the target it created with the
// target held open, returns with the target gone, and leaves the close to this goroutine.
// A crash loses nothing: the kernel closes what the process held, and frees the blocks then.
//
// The zero value is ready to use; stop closes what is left and ends the goroutine.
type lateCloser struct {
	mu      sync.Mutex
	fds     chan int
	done    chan struct{}
	stopped bool
	// closeFD is what the goroutine closes with: unix.Close, unless a test holds it.
	closeFD func(fd int) error
}

// close closes fd in the background, or now when the backlog is full or the closer stopped.
func (c *lateCloser) close(fd int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		unix.Close(fd)
		return
	}
	if c.fds == nil {
		c.fds, c.done = make(chan int, lateCloseBacklog), make(chan struct{})
		closeFD := c.closeFD
		if closeFD == nil {
			closeFD = unix.Close
		}
		go func(fds <-chan int, done chan<- struct{}) {
			defer close(done)
			for fd := range fds {
				// The kernel releases a descriptor whatever close returns; there is no one
				// to tell, and nothing to retry.
				_ = closeFD(fd)
			}
		}(c.fds, c.done)
	}
	select {
	case c.fds <- fd:
	default:
		unix.Close(fd)
	}
}

// stop closes every descriptor still waiting and ends the goroutine; later closes happen in
// the call.
func (c *lateCloser) stop() {
	c.mu.Lock()
	c.stopped = true
	fds, done := c.fds, c.done
	c.fds = nil
	c.mu.Unlock()
	if fds != nil {
		close(fds)
		<-done
	}
}
