package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// TestBuild builds a database from two reports and checks what govulncheck reads:
// the index of modules with their reports and fixed versions, the newest
// modification time, and each report as it was.
func TestBuild(t *testing.T) {
	out := t.TempDir()
	if err := run("", "testdata/osv", out); err != nil {
		t.Fatal(err)
	}
	var db struct{ Modified time.Time }
	readJSON(t, filepath.Join(out, "index", "db.json"), &db)
	if want := time.Date(2099, 3, 4, 0, 0, 0, 0, time.UTC); !db.Modified.Equal(want) {
		t.Errorf("db modified %v, want %v", db.Modified, want)
	}
	var mods []moduleIndex
	readJSON(t, filepath.Join(out, "index", "modules.json"), &mods)
	type got struct{ path, id, fixed string }
	var list []got
	for _, m := range mods {
		for _, v := range m.Vulns {
			list = append(list, got{m.Path, v.ID, v.Fixed})
		}
	}
	want := []got{{"example.com/a", "GO-2099-0001", "1.2.3"}, {"example.com/a", "GO-2099-0002", ""}, {"stdlib", "GO-2099-0001", "1.26.9"}}
	if !reflect.DeepEqual(list, want) {
		t.Errorf("modules index %v, want %v", list, want)
	}
	for _, id := range []string{"GO-2099-0001", "GO-2099-0002"} {
		b, err := os.ReadFile(filepath.Join(out, "ID", id+".json"))
		orig, _ := os.ReadFile(filepath.Join("testdata", "osv", id+".json"))
		if err != nil || string(b) != string(orig) {
			t.Errorf("%s: report not copied as it was (%v)", id, err)
		}
	}
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func TestBadInput(t *testing.T) {
	for _, tc := range []struct{ name, doc string }{
		{"not json", `{`},
		{"no id", `{"affected":[{"package":{"name":"a"}}]}`},
		{"id with a path", `{"id":"../x","affected":[{"package":{"name":"a"}}]}`},
		{"nothing affected", `{"id":"GO-1"}`},
		{"module without a name", `{"id":"GO-1","affected":[{"package":{}}]}`},
	} {
		if _, err := parse([]byte(tc.doc)); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if err := run("", "", t.TempDir()); err == nil {
		t.Error("run without -module or -osv succeeded")
	}
	if err := run("", t.TempDir(), t.TempDir()); err == nil {
		t.Error("an empty report directory made a database")
	}
}

func FuzzParse(f *testing.F) {
	for _, name := range []string{"GO-2099-0001.json", "GO-2099-0002.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", "osv", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"id":"..","affected":[{"package":{"name":"a"}}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := parse(b)
		if err != nil {
			return
		}
		if e.ID == "" || filepath.Base(e.ID) != e.ID || e.ID == "." || e.ID == ".." || len(e.Affected) == 0 {
			t.Fatalf("accepted %q with id %q", b, e.ID)
		}
	})
}
