// Command vulndb builds the vulnerability database govulncheck reads (-db file://DIR)
// from the Go vulnerability reports published as the golang.org/x/vulndb module, for
// machines that reach the Go module proxy but not vuln.go.dev.
//
// Usage:
//
//	go run ./internal/cmd/vulndb -module golang.org/x/vulndb@VERSION -out DIR
//	go run ./internal/cmd/vulndb -osv DIR_OF_OSV_JSON -out DIR
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

func main() {
	module := flag.String("module", "", "module@version holding the reports in data/osv (fetched with go mod download)")
	osvDir := flag.String("osv", "", "directory of OSV reports (instead of -module)")
	out := flag.String("out", "", "directory to write the database to")
	flag.Parse()
	if err := run(*module, *osvDir, *out); err != nil {
		fmt.Fprintln(os.Stderr, "vulndb:", err)
		os.Exit(1)
	}
}

func run(module, osvDir, out string) error {
	if out == "" || (module == "") == (osvDir == "") {
		return errors.New("want -out and one of -module or -osv")
	}
	if module != "" {
		dir, err := download(module)
		if err != nil {
			return err
		}
		osvDir = filepath.Join(dir, "data", "osv")
	}
	entries, err := load(osvDir)
	if err != nil {
		return err
	}
	if len(entries) == 0 {
		return fmt.Errorf("no OSV reports in %s", osvDir)
	}
	return write(out, entries)
}

// download fetches module@version through the module proxy and returns its directory.
func download(module string) (string, error) {
	cmd := exec.Command("go", "mod", "download", "-json", module)
	cmd.Dir = os.TempDir() // outside any module: nothing here is a dependency
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %w: %s", module, err, stderr.Bytes())
	}
	var info struct{ Dir, Error string }
	if err := json.Unmarshal(b, &info); err != nil {
		return "", fmt.Errorf("go mod download %s: %w", module, err)
	}
	if info.Error != "" || info.Dir == "" {
		return "", fmt.Errorf("go mod download %s: %s", module, info.Error)
	}
	return info.Dir, nil
}

// entry is one report: the fields the index needs, and the report as it was.
type entry struct {
	ID       string    `json:"id"`
	Modified time.Time `json:"modified"`
	Aliases  []string  `json:"aliases,omitempty"`
	Affected []struct {
		Package struct {
			Name string `json:"name"`
		} `json:"package"`
		Ranges []struct {
			Events []struct {
				Fixed string `json:"fixed,omitempty"`
			} `json:"events"`
		} `json:"ranges"`
	} `json:"affected"`
	raw []byte
}

// parse reads one OSV report; it must name an ID and at least one affected module.
func parse(b []byte) (*entry, error) {
	var e entry
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, err
	}
	if e.ID == "" || strings.ContainsAny(e.ID, `/\`) || e.ID == "." || e.ID == ".." {
		return nil, fmt.Errorf("bad id %q", e.ID)
	}
	if len(e.Affected) == 0 {
		return nil, fmt.Errorf("%s: no affected modules", e.ID)
	}
	for _, a := range e.Affected {
		if a.Package.Name == "" {
			return nil, fmt.Errorf("%s: an affected module without a path", e.ID)
		}
	}
	e.raw = b
	return &e, nil
}

func load(dir string) ([]*entry, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	var out []*entry
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		e, err := parse(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		out = append(out, e)
	}
	return out, nil
}

type moduleVuln struct {
	ID       string    `json:"id"`
	Modified time.Time `json:"modified"`
	Fixed    string    `json:"fixed,omitempty"`
}

type moduleIndex struct {
	Path  string       `json:"path"`
	Vulns []moduleVuln `json:"vulns"`
}

// write lays the database out as govulncheck's file source reads it: index/db.json,
// index/modules.json, index/vulns.json and ID/<id>.json.
func write(out string, entries []*entry) error {
	for _, d := range []string{"index", "ID"} {
		if err := os.MkdirAll(filepath.Join(out, d), 0o755); err != nil {
			return err
		}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].ID < entries[j].ID })
	var latest time.Time
	modules := map[string][]moduleVuln{}
	type vulnIndex struct {
		ID       string    `json:"id"`
		Modified time.Time `json:"modified"`
		Aliases  []string  `json:"aliases,omitempty"`
	}
	var vulns []vulnIndex
	for _, e := range entries {
		if e.Modified.After(latest) {
			latest = e.Modified
		}
		vulns = append(vulns, vulnIndex{e.ID, e.Modified, e.Aliases})
		for _, a := range e.Affected {
			// The index's fixed version only lets govulncheck skip a report early;
			// the report itself has every range.
			fixed := ""
			for _, r := range a.Ranges {
				for _, ev := range r.Events {
					if ev.Fixed != "" {
						fixed = ev.Fixed
					}
				}
			}
			modules[a.Package.Name] = append(modules[a.Package.Name], moduleVuln{ID: e.ID, Modified: e.Modified, Fixed: fixed})
		}
		if err := os.WriteFile(filepath.Join(out, "ID", e.ID+".json"), e.raw, 0o644); err != nil {
			return err
		}
	}
	var mods []moduleIndex
	for p, v := range modules {
		mods = append(mods, moduleIndex{p, v})
	}
	sort.Slice(mods, func(i, j int) bool { return mods[i].Path < mods[j].Path })
	for name, v := range map[string]any{"db.json": map[string]time.Time{"modified": latest}, "modules.json": mods, "vulns.json": vulns} {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(out, "index", name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}
