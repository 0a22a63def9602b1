package netlab

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// DownOptions selects what Down removes.
//
// The zero value removes the leftovers of every lab whose process is gone and leaves
// running labs alone.
type DownOptions struct {
	// RunID removes that run only, live or not.
	RunID string
	// All removes every lab, including running ones.
	All bool
}

// DownResult is what Down did.
type DownResult struct {
	// Removed lists the namespaces ("netns NAME") and links ("link NAME") removed.
	Removed []string
	// Running lists the run IDs of labs left alone because their process is alive.
	Running []string
}

// Down removes lab namespaces (and root-namespace links) that a lab did not clean up,
// for instance because its process was killed.
func Down(ctx context.Context, opts DownOptions) (DownResult, error) {
	var res DownResult
	if err := CheckRoot(); err != nil {
		return res, err
	}
	prefix := NamePrefix
	if opts.RunID != "" {
		prefix = NamePrefix + opts.RunID + "-"
	}
	names, err := listNamespaces(prefix)
	if err != nil {
		return res, err
	}
	live := map[string]bool{}
	var errs []error
	for _, ns := range names {
		id, _, _ := strings.Cut(strings.TrimPrefix(ns, NamePrefix), "-")
		if opts.RunID == "" && !opts.All {
			alive, seen := live[id]
			if !seen {
				alive = runAlive(id)
				live[id] = alive
				if alive {
					res.Running = append(res.Running, id)
				}
			}
			if alive {
				continue
			}
		}
		if err := removeNamespace(ctx, ns); err != nil {
			errs = append(errs, err)
			continue
		}
		res.Removed = append(res.Removed, "netns "+ns)
	}
	for _, link := range rootLinks(prefix) {
		if err := run(ctx, "", "ip", "link", "del", link); err != nil {
			errs = append(errs, err)
			continue
		}
		res.Removed = append(res.Removed, "link "+link)
	}
	// Lock files of runs that are gone.
	if ents, err := os.ReadDir(lockDir); err == nil {
		for _, e := range ents {
			id, ok := strings.CutSuffix(e.Name(), ".lock")
			if !ok || (opts.RunID != "" && id != opts.RunID) {
				continue
			}
			if opts.RunID != "" || !runAlive(id) {
				os.Remove(filepath.Join(lockDir, e.Name()))
			}
		}
	}
	slices.Sort(res.Removed)
	return res, errors.Join(errs...)
}

// runAlive reports whether the lab with this run ID still has an owner: its process
// holds an flock on the run's lock file until Close or exit.
func runAlive(id string) bool {
	f, err := os.Open(filepath.Join(lockDir, id+".lock"))
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}
