package tenancy

import (
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		in      Tenancy
		wantErr string
	}{
		{name: "every namespace", in: Tenancy{Namespaces: []string{"*"}}},
		{name: "names", in: Tenancy{Namespaces: []string{"a", "b"}}},
		{name: "service accounts", in: Tenancy{Namespaces: []string{"a"}, ServiceAccounts: []string{"a/x", "a/y.z"}}},
		{name: "service account under every namespace", in: Tenancy{Namespaces: []string{"*"}, ServiceAccounts: []string{"b/x"}}},
		{name: "selector", in: Tenancy{Namespaces: []string{"*"}, NamespaceSelector: "team=a,env in (x,y)"}},
		{name: "undeclared", in: Tenancy{}, wantErr: "namespaces=* for every namespace"},
		{name: "undeclared with service accounts", in: Tenancy{ServiceAccounts: []string{"a/x"}}, wantErr: "declare who may use it"},
		{name: "star and names", in: Tenancy{Namespaces: []string{"*", "a"}}, wantErr: "alone"},
		{name: "bad namespace", in: Tenancy{Namespaces: []string{"A_b"}}, wantErr: "not a namespace name"},
		{name: "bad selector", in: Tenancy{Namespaces: []string{"a"}, NamespaceSelector: "a in"}, wantErr: "namespaceSelector"},
		{name: "service account without namespace", in: Tenancy{Namespaces: []string{"a"}, ServiceAccounts: []string{"x"}}, wantErr: "NAMESPACE/NAME"},
		{name: "service account bad name", in: Tenancy{Namespaces: []string{"a"}, ServiceAccounts: []string{"a/X Y"}}, wantErr: "not a service account name"},
		{name: "service account of an unlisted namespace", in: Tenancy{Namespaces: []string{"a"}, ServiceAccounts: []string{"b/x"}}, wantErr: "can never be allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.in.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestAuthorizeIdentity(t *testing.T) {
	all := Tenancy{Namespaces: []string{"*"}}
	teamA := Tenancy{Namespaces: []string{"team-a", "shared"}}
	writer := Tenancy{Namespaces: []string{"team-a"}, ServiceAccounts: []string{"team-a/writer"}}
	anyWriter := Tenancy{Namespaces: []string{"*"}, ServiceAccounts: []string{"team-a/writer"}}
	tests := []struct {
		name    string
		t       Tenancy
		id      Identity
		wantErr string
	}{
		{name: "every namespace, known pod", t: all, id: Identity{Namespace: "x", ServiceAccount: "y"}},
		{name: "every namespace, unknown pod", t: all, id: Identity{}},
		{name: "listed namespace", t: teamA, id: Identity{Namespace: "shared"}},
		{name: "unlisted namespace", t: teamA, id: Identity{Namespace: "team-b"}, wantErr: "namespace team-b is not allowed; the entry allows namespaces team-a, shared"},
		{name: "unknown namespace", t: teamA, id: Identity{}, wantErr: "namespace is unknown"},
		{name: "listed service account", t: writer, id: Identity{Namespace: "team-a", ServiceAccount: "writer"}},
		{name: "unlisted service account", t: writer, id: Identity{Namespace: "team-a", ServiceAccount: "default"}, wantErr: "service account team-a/default is not allowed"},
		{name: "unknown service account", t: writer, id: Identity{Namespace: "team-a"}, wantErr: "service account is unknown"},
		{name: "same name elsewhere", t: anyWriter, id: Identity{Namespace: "team-b", ServiceAccount: "writer"}, wantErr: "team-b/writer is not allowed"},
		{name: "service account under every namespace", t: anyWriter, id: Identity{Namespace: "team-a", ServiceAccount: "writer"}},
		{name: "service account list without namespace", t: anyWriter, id: Identity{}, wantErr: "namespace is unknown"},
		{name: "undeclared allows nobody", t: Tenancy{}, id: Identity{Namespace: "a", ServiceAccount: "b"}, wantErr: "no pod may use it"},
		// The selector is for the webhook: a node cannot read labels, so it does not decide here.
		{name: "selector not evaluated on nodes", t: Tenancy{Namespaces: []string{"*"}, NamespaceSelector: "team=a"}, id: Identity{Namespace: "x"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.t.AuthorizeIdentity(tt.id)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestAuthorizeNamespaceLabels(t *testing.T) {
	sel := Tenancy{Namespaces: []string{"*"}, NamespaceSelector: "team=a,env notin (prod)"}
	if err := sel.AuthorizeNamespaceLabels("x", map[string]string{"team": "a", "env": "dev"}); err != nil {
		t.Fatal(err)
	}
	for _, l := range []map[string]string{nil, {"team": "b"}, {"team": "a", "env": "prod"}} {
		err := sel.AuthorizeNamespaceLabels("x", l)
		if err == nil || !strings.Contains(err.Error(), `namespace x does not carry the labels the entry requires (namespaceSelector "team=a,env notin (prod)")`) {
			t.Errorf("labels %v: error = %v", l, err)
		}
	}
	if err := (Tenancy{Namespaces: []string{"a"}}).AuthorizeNamespaceLabels("a", nil); err != nil {
		t.Fatalf("no selector: %v", err)
	}
}

func TestNormalizeSortsSelector(t *testing.T) {
	got := Tenancy{Namespaces: []string{"*"}, NamespaceSelector: "z=1, a in (y,x)"}.Normalize().NamespaceSelector
	if got != "a in (x,y),z=1" {
		t.Fatalf("Normalize = %q", got)
	}
}

// BenchmarkAuthorizeIdentity is the cost the node plugin adds to every hostdir publish.
func BenchmarkAuthorizeIdentity(b *testing.B) {
	t := Tenancy{Namespaces: []string{"a", "b", "c", "team-a"}, ServiceAccounts: []string{"team-a/x", "team-a/writer"}}
	id := Identity{Namespace: "team-a", ServiceAccount: "writer"}
	for b.Loop() {
		if err := t.AuthorizeIdentity(id); err != nil {
			b.Fatal(err)
		}
	}
}
