package bench

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Percentile returns the p-th percentile (0-100) of xs by linear interpolation between the
// closest ranks (NaN for no samples).
func Percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s) == 1 {
		return s[0]
	}
	r := p / 100 * float64(len(s)-1)
	lo := int(math.Floor(r))
	hi := min(lo+1, len(s)-1)
	return s[lo] + (s[hi]-s[lo])*(r-float64(lo))
}

// Seconds converts durations to seconds.
func Seconds(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = d.Seconds()
	}
	return out
}

// FmtSeconds formats seconds for the report: ms below 10 s.
func FmtSeconds(s float64) string {
	switch {
	case math.IsNaN(s):
		return "n/a"
	case s < 0.01:
		return fmt.Sprintf("%.2f ms", s*1000)
	case s < 10:
		return fmt.Sprintf("%.0f ms", s*1000)
	}
	return fmt.Sprintf("%.1f s", s)
}

// HistQuantile estimates a quantile (0-1) from cumulative Prometheus buckets (upper bound ->
// cumulative count) the way histogram_quantile does: linear within the bucket.
func HistQuantile(q float64, bounds []float64, cum []float64) float64 {
	if len(cum) == 0 || cum[len(cum)-1] == 0 {
		return math.NaN()
	}
	total := cum[len(cum)-1]
	rank := q * total
	prevB, prevC := 0.0, 0.0
	for i, b := range bounds {
		if cum[i] >= rank {
			if math.IsInf(b, 1) {
				return prevB
			}
			if cum[i] == prevC {
				return b
			}
			return prevB + (b-prevB)*(rank-prevC)/(cum[i]-prevC)
		}
		prevB, prevC = b, cum[i]
	}
	return prevB
}
