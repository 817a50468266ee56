package librarycache

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	dockerconfig "github.com/docker/cli/cli/config"
	"github.com/docker/cli/cli/config/configfile"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// secretDirKeychain resolves credentials from image pull secrets that the administrator
// mounts into a directory. Files are read at every resolution (pulls are rare), so a rotated
// secret applies without a restart.
//
// Matching follows kubelet's rules for pull secrets, without wildcards: a key names a
// registry host, optionally with a repository path prefix, and the longest matching key wins.
// Credential helpers and credential stores named in a secret are ignored: a secret must never
// make the plugin run a program.
type secretDirKeychain struct {
	dir string
	log *slog.Logger
}

// secretFilePatterns are where secrets show up below the directory: a projected or plain
// secret volume per subdirectory (key .dockerconfigjson or the legacy .dockercfg), or a
// docker config.json placed directly.
var secretFilePatterns = []string{
	".dockerconfigjson", ".dockercfg", "config.json",
	"*/.dockerconfigjson", "*/.dockercfg", "*/config.json",
}

func (k *secretDirKeychain) Resolve(res authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), res)
}

func (k *secretDirKeychain) ResolveContext(_ context.Context, res authn.Resource) (authn.Authenticator, error) {
	var best *authn.AuthConfig
	bestLen := -1
	for _, pattern := range secretFilePatterns {
		files, _ := filepath.Glob(filepath.Join(k.dir, pattern))
		for _, f := range files {
			// Kubernetes mounts keys as symlinks into ..data; "..data/x" and "x" are the
			// same file, reading it twice is harmless.
			cf, err := loadDockerConfig(f)
			if err != nil {
				// Never log the content: it holds credentials.
				k.log.Warn("ignoring unreadable pull secret", "file", f, "error", err)
				continue
			}
			for key, ac := range cf.GetAuthConfigs() {
				n, ok := matchAuthKey(key, res)
				if !ok || n <= bestLen {
					continue
				}
				bestLen = n
				best = &authn.AuthConfig{
					Username: ac.Username, Password: ac.Password,
					IdentityToken: ac.IdentityToken, RegistryToken: ac.RegistryToken,
				}
			}
		}
	}
	if best == nil {
		return authn.Anonymous, nil
	}
	return authn.FromConfig(*best), nil
}

// loadDockerConfig reads a docker config with the loader go-containerregistry's default
// keychain uses; a legacy .dockercfg (a bare map of auths) is wrapped first.
func loadDockerConfig(file string) (*configfile.ConfigFile, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var r io.Reader = bytes.NewReader(data)
	if filepath.Base(file) == ".dockercfg" {
		r = io.MultiReader(strings.NewReader(`{"auths":`), bytes.NewReader(data), strings.NewReader(`}`))
	}
	return dockerconfig.LoadFromReader(r)
}

// matchAuthKey reports whether a docker config key ("https://index.docker.io/v1/",
// "registry.example:5000", "registry.example/team") covers res, and how specific it is.
func matchAuthKey(key string, res authn.Resource) (int, bool) {
	key = strings.TrimPrefix(strings.TrimPrefix(key, "https://"), "http://")
	key = strings.TrimSuffix(key, "/")
	key = strings.TrimSuffix(strings.TrimSuffix(key, "/v1"), "/v2")
	host, repoPath, _ := strings.Cut(key, "/")
	reg, err := name.NewRegistry(host, name.WeakValidation)
	if err != nil || reg.RegistryStr() != res.RegistryStr() {
		return 0, false
	}
	if repoPath == "" {
		return 0, true
	}
	target := strings.TrimPrefix(strings.TrimPrefix(res.String(), res.RegistryStr()), "/")
	if target != repoPath && !strings.HasPrefix(target, repoPath+"/") {
		return 0, false
	}
	return len(repoPath), true
}
