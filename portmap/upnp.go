package portmap

import (
	"bufio"
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// UPnP IGD constants.
const (
	ssdpPort       = 1900
	igdDevice1     = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
	igdDevice2     = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
	wanIPService1  = "urn:schemas-upnp-org:service:WANIPConnection:1"
	wanIPService2  = "urn:schemas-upnp-org:service:WANIPConnection:2"
	wanPPPService1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
	// maxHTTPBody bounds what is read of a description or SOAP answer.
	maxHTTPBody = 1 << 20
	// maxLeaseV2 is IGDv2's largest lease (WANIPConnection:2, section 2.3.16).
	maxLeaseV2 = 604800 * time.Second

	upnpInvalidAction          = 401
	upnpOptionalNotImplemented = 602
	upnpNoSuchEntry            = 714
	upnpConflict               = 718
	upnpOnlyPermanentLeases    = 725
)

var ssdpGroup = netip.MustParseAddrPort("239.255.255.250:1900")

// ssdpResponse is a unicast answer to M-SEARCH.
type ssdpResponse struct {
	Location *url.URL
	ST       string
	USN      string
}

// parseSSDPResponse parses an M-SEARCH answer: an HTTP/1.1 200 response over UDP with a
// LOCATION naming an http URL with a literal IP host.
func parseSSDPResponse(b []byte) (ssdpResponse, error) {
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(b)), nil)
	if err != nil {
		return ssdpResponse{}, fmt.Errorf("%w: SSDP answer: %v", ErrMalformed, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ssdpResponse{}, fmt.Errorf("%w: SSDP answer status %q", ErrMalformed, resp.Status)
	}
	loc := resp.Header.Get("Location")
	if loc == "" {
		return ssdpResponse{}, fmt.Errorf("%w: SSDP answer without LOCATION", ErrMalformed)
	}
	u, err := url.Parse(loc)
	if err != nil {
		return ssdpResponse{}, fmt.Errorf("%w: SSDP LOCATION %q: %v", ErrMalformed, loc, err)
	}
	if u.Scheme != "http" {
		return ssdpResponse{}, fmt.Errorf("%w: SSDP LOCATION %q is not http", ErrMalformed, loc)
	}
	if _, err := hostAddr(u); err != nil {
		return ssdpResponse{}, fmt.Errorf("%w: SSDP LOCATION %q: %v", ErrMalformed, loc, err)
	}
	return ssdpResponse{Location: u, ST: resp.Header.Get("St"), USN: resp.Header.Get("Usn")}, nil
}

// hostAddr is a URL's host as a literal IP address.
func hostAddr(u *url.URL) (netip.Addr, error) {
	a, err := netip.ParseAddr(u.Hostname())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("host %q is no IP address", u.Hostname())
	}
	return a.Unmap(), nil
}

func mSearch(st string, unicast bool) []byte {
	var b strings.Builder
	b.WriteString("M-SEARCH * HTTP/1.1\r\n")
	fmt.Fprintf(&b, "HOST: %s\r\n", ssdpGroup)
	b.WriteString("MAN: \"ssdp:discover\"\r\n")
	if !unicast {
		b.WriteString("MX: 1\r\n")
	}
	fmt.Fprintf(&b, "ST: %s\r\n\r\n", st)
	return []byte(b.String())
}

// ssdpDiscover finds an internet gateway device. It asks the SSDP group and the gateway
// directly, and returns the first answer from the gateway, or, failing that by the
// timeout, the first from anyone else when the gateway was not configured.
func ssdpDiscover(ctx context.Context, c cfg, gw netip.Addr) (ssdpResponse, error) {
	conn, err := c.net.ListenPacket(ctx, "udp4", ":0")
	if err != nil {
		return ssdpResponse{}, fmt.Errorf("portmap: socket: %w", err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()

	dsts := []netip.AddrPort{c.SSDPAddr}
	if !c.SSDPAddr.IsValid() {
		dsts = []netip.AddrPort{ssdpGroup, netip.AddrPortFrom(gw, ssdpPort)}
	}
	send := func() {
		for _, d := range dsts {
			for _, st := range []string{igdDevice2, igdDevice1} {
				// Errors are left to the read timeout: the multicast send fails on hosts
				// without a multicast route while the unicast one still works.
				conn.WriteTo(mSearch(st, !d.Addr().IsMulticast()), net.UDPAddrFromAddrPort(d))
			}
		}
	}
	deadline := time.Now().Add(c.Timeout)
	rto := initialRTO
	buf := make([]byte, 4096)
	var other *ssdpResponse
	var lastErr error
	for time.Now().Before(deadline) {
		send()
		next := time.Now().Add(rto)
		if next.After(deadline) {
			next = deadline
		}
		rto *= 2
		conn.SetReadDeadline(next)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				if cerr := ctx.Err(); cerr != nil {
					return ssdpResponse{}, cerr
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break
				}
				return ssdpResponse{}, fmt.Errorf("portmap: SSDP: %w", err)
			}
			r, err := parseSSDPResponse(buf[:n])
			if err != nil {
				lastErr = err
				continue
			}
			if !strings.Contains(r.ST, "InternetGatewayDevice") {
				continue
			}
			src, _ := from.(*net.UDPAddr)
			loc, _ := hostAddr(r.Location)
			if src == nil || src.AddrPort().Addr().Unmap() != loc {
				// A description served from elsewhere than the answer came from would let
				// one LAN host point us at another.
				lastErr = fmt.Errorf("%w: SSDP answer from %v names %v", ErrMalformed, from, r.Location)
				continue
			}
			if loc == gw {
				return r, nil
			}
			if other == nil {
				other = &r
			}
		}
	}
	if other != nil && !c.Gateway.IsValid() {
		return *other, nil
	}
	if lastErr != nil {
		return ssdpResponse{}, fmt.Errorf("%w: no usable UPnP gateway answer: %w", ErrNotSupported, lastErr)
	}
	return ssdpResponse{}, fmt.Errorf("%w: no UPnP internet gateway device answered within %v", ErrNotSupported, c.Timeout)
}

// xmlDevice is a device in a UPnP description; devices nest.
type xmlDevice struct {
	DeviceType string       `xml:"deviceType"`
	Services   []xmlService `xml:"serviceList>service"`
	Devices    []xmlDevice  `xml:"deviceList>device"`
}

type xmlService struct {
	ServiceType string `xml:"serviceType"`
	ControlURL  string `xml:"controlURL"`
}

type xmlRoot struct {
	URLBase string    `xml:"URLBase"`
	Device  xmlDevice `xml:"device"`
}

// igdService is the WAN connection service chosen from a description.
type igdService struct {
	Type    string
	Version int
	Control *url.URL
}

// parseDescription finds the best WAN connection service in a device description
// fetched from location: WANIPConnection:2, then :1, then WANPPPConnection:1. The
// service's Version is what will be used of it: at most maxVersion. Its control URL must be on the description's host.
func parseDescription(b []byte, location *url.URL, maxVersion int) (igdService, error) {
	var root xmlRoot
	if err := xml.Unmarshal(b, &root); err != nil {
		return igdService{}, fmt.Errorf("%w: device description: %v", ErrMalformed, err)
	}
	base := location
	if root.URLBase != "" {
		u, err := url.Parse(strings.TrimSpace(root.URLBase))
		if err != nil {
			return igdService{}, fmt.Errorf("%w: URLBase %q: %v", ErrMalformed, root.URLBase, err)
		}
		base = location.ResolveReference(u)
	}
	rank := func(t string) (int, int) {
		switch {
		case t == wanIPService2:
			// IGDv2 keeps every IGDv1 action, so a v1 client can use it as v1;
			// out-of-range limits are clamped so the version is always 1 or 2.
			return 3, max(1, min(maxVersion, 2))
		case t == wanIPService1:
			return 2, 1
		case t == wanPPPService1:
			return 1, 1
		}
		return 0, 0
	}
	var best xmlService
	bestRank, bestVersion := 0, 0
	var walk func(d *xmlDevice, depth int)
	walk = func(d *xmlDevice, depth int) {
		if depth > 8 {
			return
		}
		for _, s := range d.Services {
			if r, v := rank(strings.TrimSpace(s.ServiceType)); r > bestRank {
				best, bestRank, bestVersion = s, r, v
			}
		}
		for i := range d.Devices {
			walk(&d.Devices[i], depth+1)
		}
	}
	walk(&root.Device, 0)
	if bestRank == 0 {
		return igdService{}, fmt.Errorf("%w: device %q offers no WAN connection service", ErrNotSupported, root.Device.DeviceType)
	}
	ctl, err := url.Parse(strings.TrimSpace(best.ControlURL))
	if err != nil || best.ControlURL == "" {
		return igdService{}, fmt.Errorf("%w: control URL %q", ErrMalformed, best.ControlURL)
	}
	ctl = base.ResolveReference(ctl)
	if ctl.Scheme != "http" || ctl.Host != location.Host {
		return igdService{}, fmt.Errorf("%w: control URL %v is not on the description's host %s", ErrMalformed, ctl, location.Host)
	}
	return igdService{Type: strings.TrimSpace(best.ServiceType), Version: bestVersion, Control: ctl}, nil
}

// soapFault is a UPnP error answer's detail.
type soapFault struct {
	FaultString string `xml:"faultstring"`
	Code        string `xml:"detail>UPnPError>errorCode"`
	Description string `xml:"detail>UPnPError>errorDescription"`
}

// parseSOAPResponse reads a SOAP envelope. For a UPnP fault it returns *ResultError;
// otherwise the out arguments of the action's response element, by local name.
func parseSOAPResponse(b []byte, action string) (map[string]string, error) {
	d := xml.NewDecoder(bytes.NewReader(b))
	inBody := false
	for {
		tok, err := d.Token()
		if err == io.EOF {
			return nil, fmt.Errorf("%w: SOAP answer without %sResponse", ErrMalformed, action)
		}
		if err != nil {
			return nil, fmt.Errorf("%w: SOAP answer: %v", ErrMalformed, err)
		}
		start, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		switch {
		case !inBody && start.Name.Local == "Body":
			inBody = true
		case !inBody:
			// Envelope or Header: keep descending.
		case start.Name.Local == "Fault":
			var f soapFault
			if err := d.DecodeElement(&f, &start); err != nil {
				return nil, fmt.Errorf("%w: SOAP fault: %v", ErrMalformed, err)
			}
			code, err := strconv.Atoi(strings.TrimSpace(f.Code))
			if err != nil {
				return nil, fmt.Errorf("%w: SOAP fault %q without UPnP error code", ErrMalformed, f.FaultString)
			}
			return nil, &ResultError{Protocol: UPnP, Code: code, Text: strings.TrimSpace(f.Description)}
		case start.Name.Local == action+"Response":
			return soapArgs(d, start)
		default:
			return nil, fmt.Errorf("%w: SOAP answer %q, want %sResponse", ErrMalformed, start.Name.Local, action)
		}
	}
}

// soapArgs reads the children of a response element as name -> text.
func soapArgs(d *xml.Decoder, parent xml.StartElement) (map[string]string, error) {
	out := map[string]string{}
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: SOAP %s: %v", ErrMalformed, parent.Name.Local, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			var s string
			if err := d.DecodeElement(&s, &t); err != nil {
				return nil, fmt.Errorf("%w: SOAP %s/%s: %v", ErrMalformed, parent.Name.Local, t.Name.Local, err)
			}
			out[t.Name.Local] = strings.TrimSpace(s)
		case xml.EndElement:
			return out, nil
		}
	}
}

// soapArg is one in argument; order matters to some routers, so not a map.
type soapArg struct{ name, value string }

func soapRequest(service, action string, args []soapArg) []byte {
	var b bytes.Buffer
	b.WriteString(`<?xml version="1.0"?>` + "\r\n")
	b.WriteString(`<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>`)
	fmt.Fprintf(&b, `<u:%s xmlns:u="%s">`, action, service)
	for _, a := range args {
		fmt.Fprintf(&b, "<%s>", a.name)
		xml.EscapeText(&b, []byte(a.value))
		fmt.Fprintf(&b, "</%s>", a.name)
	}
	fmt.Fprintf(&b, `</u:%s></s:Body></s:Envelope>`, action)
	return b.Bytes()
}

// upnpClient maps one UDP port with an IGD's WAN connection service.
type upnpClient struct {
	cfg      cfg
	svc      igdService
	local    netip.Addr
	internal uint16
	http     *http.Client
	// port is the external port last added, for renewals and the delete.
	port uint16
}

// discoverUPnP finds the gateway's WAN connection service and this host's address on
// the way to it.
func discoverUPnP(ctx context.Context, c cfg, gw netip.Addr, port uint16) (*upnpClient, error) {
	r, err := ssdpDiscover(ctx, c, gw)
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Transport: &http.Transport{
		DialContext:       c.dialer.DialContext,
		DisableKeepAlives: true,
		Proxy:             nil,
	}}
	body, err := httpGet(ctx, hc, r.Location)
	if err != nil {
		return nil, err
	}
	svc, err := parseDescription(body, r.Location, c.UPnPMaxVersion)
	if err != nil {
		return nil, err
	}
	devAddr, _ := hostAddr(r.Location)
	local, err := localAddr(ctx, c.dialer, devAddr)
	if err != nil {
		return nil, err
	}
	c.log.Debug("UPnP gateway found", "location", r.Location, "service", svc.Type, "control", svc.Control)
	return &upnpClient{cfg: c, svc: svc, local: local, internal: port, http: hc}, nil
}

func httpGet(ctx context.Context, hc *http.Client, u *url.URL) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("portmap: %w", err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: fetching UPnP description: %w", ErrNotSupported, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHTTPBody))
	if err != nil {
		return nil, fmt.Errorf("portmap: reading UPnP description: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%w: UPnP description: HTTP %s", ErrNotSupported, resp.Status)
	}
	return body, nil
}

func (c *upnpClient) describe() string {
	return "upnp " + strings.TrimPrefix(c.svc.Type, "urn:schemas-upnp-org:service:")
}

// call runs one SOAP action.
func (c *upnpClient) call(ctx context.Context, action string, args []soapArg) (map[string]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.svc.Control.String(), bytes.NewReader(soapRequest(c.svc.Type, action, args)))
	if err != nil {
		return nil, fmt.Errorf("portmap: %w", err)
	}
	req.Header.Set("Content-Type", `text/xml; charset="utf-8"`)
	req.Header.Set("SOAPAction", fmt.Sprintf(`"%s#%s"`, c.svc.Type, action))
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("portmap: UPnP %s: %w", action, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxHTTPBody))
	if err != nil {
		return nil, fmt.Errorf("portmap: UPnP %s: %w", action, err)
	}
	out, err := parseSOAPResponse(body, action)
	if err != nil {
		var re *ResultError
		if !errors.As(err, &re) && resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("%w: UPnP %s: HTTP %s", ErrRefused, action, resp.Status)
		}
		return nil, fmt.Errorf("UPnP %s: %w", action, err)
	}
	return out, nil
}

func (c *upnpClient) externalIP(ctx context.Context) (netip.Addr, error) {
	out, err := c.call(ctx, "GetExternalIPAddress", nil)
	if err != nil {
		return netip.Addr{}, err
	}
	s := out["NewExternalIPAddress"]
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%w: external address %q", ErrMalformed, s)
	}
	if a = a.Unmap(); !a.Is4() || a.IsUnspecified() {
		return netip.Addr{}, fmt.Errorf("%w: gateway has no external IPv4 address (%v)", ErrRefused, a)
	}
	return a, nil
}

func (c *upnpClient) mapArgs(ext uint16, lease time.Duration) []soapArg {
	return []soapArg{
		{"NewRemoteHost", ""},
		{"NewExternalPort", strconv.Itoa(int(ext))},
		{"NewProtocol", "UDP"},
		{"NewInternalPort", strconv.Itoa(int(c.internal))},
		{"NewInternalClient", c.local.String()},
		{"NewEnabled", "1"},
		{"NewPortMappingDescription", c.cfg.Description},
		{"NewLeaseDuration", strconv.Itoa(int(lease / time.Second))},
	}
}

func (c *upnpClient) mapPort(ctx context.Context, prev *grant) (grant, error) {
	ip, err := c.externalIP(ctx)
	if err != nil {
		return grant{}, err
	}
	lease := c.cfg.Lifetime.Truncate(time.Second)
	if c.svc.Version >= 2 {
		lease = min(lease, maxLeaseV2)
	}
	lease = max(lease, time.Second)
	// A renewal re-adds the same port, which routers treat as an update of our own entry.
	if prev != nil && c.port != 0 {
		lease, err = c.add(ctx, c.port, lease)
		if err == nil {
			return grant{netip.AddrPortFrom(ip, c.port), lease}, nil
		}
		c.cfg.log.Debug("UPnP renewal of port refused, asking for a new one", "port", c.port, "err", err)
	}
	if c.svc.Version >= 2 {
		out, err := c.call(ctx, "AddAnyPortMapping", c.mapArgs(c.internal, lease))
		if err == nil {
			p, perr := strconv.ParseUint(out["NewReservedPort"], 10, 16)
			if perr != nil || p == 0 {
				return grant{}, fmt.Errorf("%w: AddAnyPortMapping reserved port %q", ErrMalformed, out["NewReservedPort"])
			}
			c.port = uint16(p)
			return grant{netip.AddrPortFrom(ip, c.port), lease}, nil
		}
		if !errors.Is(err, ErrNotSupported) {
			return grant{}, err
		}
		// Some IGDv2 devices leave out the optional action; fall through to v1's.
	}
	// IGDv1 has no "any port": try our own port, then a few random ones.
	try := []uint16{c.internal}
	for range 3 {
		try = append(try, uint16(1024+rand.IntN(65536-1024)))
	}
	for _, p := range try {
		got, err := c.add(ctx, p, lease)
		var re *ResultError
		if errors.As(err, &re) && re.Code == upnpConflict {
			continue
		}
		if err != nil {
			return grant{}, err
		}
		c.port = p
		return grant{netip.AddrPortFrom(ip, p), got}, nil
	}
	return grant{}, fmt.Errorf("%w: every external port tried is taken", ErrRefused)
}

// add runs AddPortMapping, falling back to a permanent mapping for IGDv1 routers that
// allow no leases (error 725). It returns the lease granted: zero for permanent.
func (c *upnpClient) add(ctx context.Context, ext uint16, lease time.Duration) (time.Duration, error) {
	_, err := c.call(ctx, "AddPortMapping", c.mapArgs(ext, lease))
	var re *ResultError
	if errors.As(err, &re) && re.Code == upnpOnlyPermanentLeases {
		_, err = c.call(ctx, "AddPortMapping", c.mapArgs(ext, 0))
		return 0, err
	}
	return lease, err
}

func (c *upnpClient) unmap(ctx context.Context) error {
	_, err := c.call(ctx, "DeletePortMapping", []soapArg{
		{"NewRemoteHost", ""},
		{"NewExternalPort", strconv.Itoa(int(c.port))},
		{"NewProtocol", "UDP"},
	})
	var re *ResultError
	if errors.As(err, &re) && re.Code == upnpNoSuchEntry {
		return nil // already gone, which is what was asked
	}
	if err == nil {
		c.http.CloseIdleConnections()
	}
	return err
}
