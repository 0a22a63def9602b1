package faultlab

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"
)

// Row is one line of a fault report: what was done, what lived through it, and how long
// until service was back.
type Row struct {
	Fault    string
	Survived string
	// Recovery is how long until the affected service worked again; negative means it
	// never did within the test's wait.
	Recovery time.Duration
	Note     string
}

// Never is the Recovery of something that did not recover.
const Never = time.Duration(-1)

// Table formats rows as an aligned text table with a header.
func Table(rows []Row) string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "fault\tsurvived\trecovery\tnote")
	for _, r := range rows {
		rec := "never"
		if r.Recovery >= 0 {
			rec = r.Recovery.Round(time.Millisecond).String()
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", r.Fault, r.Survived, rec, r.Note)
	}
	w.Flush()
	return b.String()
}
