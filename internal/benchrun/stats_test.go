package benchrun

import (
	"math"
	"slices"
	"testing"
)

func TestSummarize(t *testing.T) {
	nan, inf := math.NaN(), math.Inf(1)
	tests := []struct {
		name string
		in   []float64
		want Summary
	}{
		{"none", nil, Summary{}},
		{"one", []float64{7}, Summary{Median: 7, Min: 7, Max: 7, N: 1}},
		{"odd, unsorted", []float64{3, 1, 2}, Summary{Median: 2, Min: 1, Max: 3, N: 3}},
		{"even: mean of the middle two", []float64{4, 1, 3, 2}, Summary{Median: 2.5, Min: 1, Max: 4, N: 4}},
		{"outlier does not move the median", []float64{10, 11, 1e9}, Summary{Median: 11, Min: 10, Max: 1e9, N: 3}},
		{"NaN and infinity left out", []float64{nan, 5, inf, 1, 3}, Summary{Median: 3, Min: 1, Max: 5, N: 3}},
		{"only NaN", []float64{nan}, Summary{}},
		{"negative", []float64{-1, -3, -2}, Summary{Median: -2, Min: -3, Max: -1, N: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in := slices.Clone(tt.in)
			if got := Summarize(in); got != tt.want {
				t.Fatalf("Summarize(%v) = %+v, want %+v", tt.in, got, tt.want)
			}
			for i := range in {
				if in[i] != tt.in[i] && !math.IsNaN(in[i]) {
					t.Fatalf("Summarize reordered its input: %v", in)
				}
			}
		})
	}
}

func TestRatios(t *testing.T) {
	tests := []struct {
		name string
		a, b []float64
		want []float64
	}{
		{"paired", []float64{10, 20, 30}, []float64{5, 10, 10}, []float64{2, 2, 3}},
		{"zero divisor left out", []float64{10, 20}, []float64{0, 10}, []float64{2}},
		{"shorter wins", []float64{10, 20, 30}, []float64{10}, []float64{1}},
		{"none", nil, []float64{1}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Ratios(tt.a, tt.b); !slices.Equal(got, tt.want) {
				t.Fatalf("Ratios = %v, want %v", got, tt.want)
			}
		})
	}
}
