package main

import (
	"encoding/json"
	"math"
	"testing"
)

func TestResultsRoundTripThroughJSON(t *testing.T) {
	in := results{
		Start:           map[string][]float64{"csi-warm": {1.5}},
		PublishHistWarm: histDelta{Bounds: []float64{0.005, 0.01, math.Inf(1)}, Cum: []float64{1, 2, 3}},
	}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatalf("the raw results cannot be written: %v", err)
	}
	var out results
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	h := out.PublishHistWarm
	if len(h.Bounds) != 3 || !math.IsInf(h.Bounds[2], 1) || h.Bounds[0] != 0.005 || h.count() != 3 {
		t.Errorf("histogram after the round trip: %+v", h)
	}
}
