package detect_test

import (
	"context"
	"fmt"
	"log"
	"net/netip"
	"time"

	"peerlink/connect/connecttest"
	"peerlink/detect"
	"peerlink/natlab"
)

// Watching for NAT changes: a detector profiles the NAT in front of a laptop, and a
// subscriber hears when the profile changes. Here the ISP gives the home router a new
// public address; a program calls Refresh when its network changes (or lets a node do
// it when peers report a new reflexive address), and the subscriber sees the new
// profile.
func ExampleDetector_Subscribe() {
	// An emulated internet with an RFC 5780 STUN server, and a laptop behind a home router.
	w, err := connecttest.Start(connecttest.Config{})
	if err != nil {
		log.Fatal(err)
	}
	defer w.Close()
	home, err := w.AddSite("laptop", "port-restricted", natlab.Link{})
	if err != nil {
		log.Fatal(err)
	}

	d := detect.New(detect.Config{
		Observers: w.STUN,
		Net:       home.Host,
		LocalIPs:  func() ([]netip.Addr, error) { return home.Host.Addrs(), nil },
	})
	defer d.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := d.Detect(ctx, detect.Options{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("detected", p.Type(), "at", p.PublicIP)

	changes, stop := d.Subscribe()
	defer stop()
	home.NAT.SetPublicIP(netip.MustParseAddr("198.51.100.200"))
	d.Refresh()
	select {
	case c := <-changes:
		fmt.Println("NAT changed:", c.Old.Type(), "at", c.Old.PublicIP, "→", c.New.Type(), "at", c.New.PublicIP)
	case <-ctx.Done():
		fmt.Println("no change seen")
	}
	// Output:
	// detected ei-pd-pp at 198.51.100.1
	// NAT changed: ei-pd-pp at 198.51.100.1 → ei-pd-pp at 198.51.100.200
}
