package grpcserver

import (
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestListenUnix(t *testing.T) {
	t.Run("a stale socket left by a crashed process is replaced", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "sub", "csi.sock")
		l1, err := ListenUnix(sock)
		if err != nil {
			t.Fatal(err)
		}
		l1.(*net.UnixListener).SetUnlinkOnClose(false)
		l1.Close()
		l2, err := ListenUnix(sock)
		if err != nil {
			t.Fatalf("stale socket not replaced: %v", err)
		}
		l2.Close()
	})
	t.Run("anything else at the endpoint is left in place", func(t *testing.T) {
		notSock := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(notSock, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ListenUnix(notSock); err == nil {
			t.Fatal("a regular file at the endpoint was removed")
		}
		if _, err := os.Stat(notSock); err != nil {
			t.Fatalf("the regular file at the endpoint is gone: %v", err)
		}
	})
}

func TestSocketPath(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"unix:///a/b.sock", "/a/b.sock"},
		{"unix:/a/b.sock", "/a/b.sock"},
		{"/a/./b.sock", "/a/b.sock"},
		{"tcp://1.2.3.4:5", ""},
		{"unix://rel.sock", ""},
		{"", ""},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := SocketPath(tc.in)
			if tc.want == "" {
				if err == nil {
					t.Fatalf("SocketPath(%q) = %q, want an error", tc.in, got)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("SocketPath(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
			}
		})
	}
}
