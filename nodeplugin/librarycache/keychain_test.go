package librarycache

import (
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

func TestSecretDirKeychain(t *testing.T) {
	dir := t.TempDir()
	write := func(rel, content string) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// base64("host:pw"), base64("team:pw"), base64("hub:pw"), base64("legacy:pw")
	write("a/.dockerconfigjson", `{"auths":{"registry.example:5000":{"auth":"aG9zdDpwdw=="},"registry.example:5000/team":{"auth":"dGVhbTpwdw=="}}}`)
	write("b/.dockerconfigjson", `{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnB3"}},"credsStore":"evil-helper"}`)
	write("c/.dockercfg", `{"legacy.example":{"auth":"bGVnYWN5OnB3"}}`)
	write("d/.dockerconfigjson", `not json`)
	k := &secretDirKeychain{dir: dir, log: slog.New(slog.DiscardHandler)}

	tests := []struct {
		repo string
		user string
	}{
		{"registry.example:5000/other/x", "host"},
		{"registry.example:5000/team/x", "team"},
		{"registry.example:5000/teamx/x", "host"},
		{"docker.io/datadog/dd-lib-java-init", "hub"},
		{"legacy.example/x", "legacy"},
		{"unknown.example/x", ""},
	}
	for _, tt := range tests {
		repo, err := name.NewRepository(tt.repo)
		if err != nil {
			t.Fatal(err)
		}
		auth, err := k.Resolve(repo)
		if err != nil {
			t.Fatalf("%s: %v", tt.repo, err)
		}
		if tt.user == "" {
			if auth != authn.Anonymous {
				t.Errorf("%s: got credentials, want anonymous", tt.repo)
			}
			continue
		}
		cfg, err := auth.Authorization()
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Username != tt.user || cfg.Password != "pw" {
			t.Errorf("%s: user %q, want %q", tt.repo, cfg.Username, tt.user)
		}
	}
}
