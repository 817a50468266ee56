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

	"github.com/apm-csi/apm-csi/shared/repoallow"
)

// secretDirKeychain resolves credentials from image pull secrets that the administrator
// mounts into a directory. Files are read at every resolution (pulls are rare), so a rotated
// secret applies without a restart.
//
// Matching follows kubelet's rules for pull secrets, without wildcards: a key names a
// registry host, optionally with a repository path prefix, and the longest matching key wins.
// Credential helpers and credential stores named in a secret are ignored: a secret must never
// make the plugin run a program.
//
// A secret with a scope (--pull-secret-scope) is only considered for the repositories and
// namespaces its scope grants; the secret's name is its subdirectory's name.
type secretDirKeychain struct {
	dir string
	log *slog.Logger
	// scopes restrict secrets by name; namespace is the requesting pod's.
	scopes    []repoallow.SecretScope
	namespace string
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
	auth, _ := k.resolve(res)
	return auth, nil
}

// resolve returns the credentials for res and the name of the secret they come from ("" for
// a config placed directly in the directory).
func (k *secretDirKeychain) resolve(res authn.Resource) (authn.Authenticator, string) {
	var best *authn.AuthConfig
	bestLen, bestSecret := -1, ""
	target := res.String()
	for _, pattern := range secretFilePatterns {
		files, _ := filepath.Glob(filepath.Join(k.dir, pattern))
		for _, f := range files {
			secret := secretName(k.dir, f)
			if !k.grants(secret, target) {
				continue
			}
			// Kubernetes mounts keys as symlinks into ..data; "..data/x" and "x" are the
			// same file, reading it twice is harmless.
			cf, err := loadDockerConfig(f)
			if err != nil {
				// Never log the content: it holds credentials.
				k.log.Warn("ignoring unreadable pull secret", "file", f, "err", err)
				continue
			}
			for key, ac := range cf.GetAuthConfigs() {
				n, ok := matchAuthKey(key, res)
				if !ok || n <= bestLen {
					continue
				}
				bestLen, bestSecret = n, secret
				best = &authn.AuthConfig{
					Username: ac.Username, Password: ac.Password,
					IdentityToken: ac.IdentityToken, RegistryToken: ac.RegistryToken,
				}
			}
		}
	}
	if best == nil {
		return authn.Anonymous, ""
	}
	return authn.FromConfig(*best), bestSecret
}

// secretName is the directory below dir that holds file ("" when directly in dir).
func secretName(dir, file string) string {
	rel, err := filepath.Rel(dir, file)
	if err != nil {
		return ""
	}
	name, _, nested := strings.Cut(rel, string(filepath.Separator))
	if !nested {
		return ""
	}
	return name
}

// grants reports whether the secret may be sent for target (registry/repository) on behalf
// of k.namespace. Secrets without a scope serve every namespace.
func (k *secretDirKeychain) grants(secret, target string) bool {
	for _, sc := range k.scopes {
		if sc.Secret == secret {
			return sc.Grants(k.namespace, target)
		}
	}
	return true
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
