package state

import (
	"reflect"
	"testing"
)

// FuzzDecodeRecord: any body, damaged or crafted, decodes to a record or an error, never a
// crash, whether start-up skips the attributes or not; what decodes is the same record both
// ways but for the attributes, and encodes back to a body that decodes to it again.
func FuzzDecodeRecord(f *testing.F) {
	c := newCodec("/state")
	own := scaleRecord("/state", 3)
	for _, r := range []*Record{fullRecord(), own, {VolumeID: "v", TargetPath: "/t"}} {
		f.Add(r.Key(), c.encodeCompact(r))
	}
	f.Add(own.Key(), []byte(`{"volumeID":"v","targetPath":"/t","attributes":{"a":"b"}}`))
	f.Fuzz(func(t *testing.T, key string, body []byte) {
		whole := decoder{c: c, paths: map[string]string{}}
		var r Record
		current, err := whole.decode(&r, key, body)
		skip := decoder{c: c, paths: map[string]string{}, skipAttributes: true}
		var idx Record
		_, skipErr := skip.decode(&idx, key, body)
		if (err == nil) != (skipErr == nil) {
			t.Fatalf("decoded whole: %v; without attributes: %v", err, skipErr)
		}
		if err != nil || !current {
			return
		}
		want := r
		want.Attributes = nil
		if !reflect.DeepEqual(idx, want) {
			t.Fatalf("without attributes %+v\nwhole %+v", idx, r)
		}
		var back Record
		if _, err := whole.decode(&back, key, c.encodeCompact(&r)); err != nil {
			t.Fatalf("the record read does not decode once written again: %v", err)
		}
		if !back.Created.Equal(r.Created) {
			t.Fatalf("created %v, then %v", r.Created, back.Created)
		}
		back.Created = r.Created
		if len(back.Attributes) == 0 && len(r.Attributes) == 0 {
			back.Attributes = r.Attributes
		}
		if len(back.Layers) == 0 && len(r.Layers) == 0 {
			back.Layers = r.Layers
		}
		if !reflect.DeepEqual(back, r) {
			t.Fatalf("written again and read %+v\nwant %+v", back, r)
		}
	})
}
