package portmap

import (
	"bytes"
	"encoding/binary"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// Small servers on loopback that speak each protocol, for unit tests. Each gateway gets
// its own 127.77.0.x address, so they all use the real port 5351 side by side.

var gatewaySeq atomic.Uint32

func newGatewayAddr(t *testing.T) netip.Addr {
	n := gatewaySeq.Add(1)
	if n > 250 {
		t.Fatal("out of test gateway addresses")
	}
	return netip.AddrFrom4([4]byte{127, 77, 0, byte(n)})
}

// udpServer answers datagrams with what handle returns, and records the requests.
type udpServer struct {
	conn   net.PacketConn
	done   chan struct{}
	handle func(req []byte, from netip.AddrPort) [][]byte

	mu   sync.Mutex
	reqs [][]byte
}

func startUDP(t *testing.T, addr netip.AddrPort, handle func(req []byte, from netip.AddrPort) [][]byte) *udpServer {
	t.Helper()
	conn, err := net.ListenPacket("udp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	s := &udpServer{conn: conn, done: make(chan struct{}), handle: handle}
	go s.serve()
	t.Cleanup(func() { conn.Close(); <-s.done })
	return s
}

func (s *udpServer) serve() {
	defer close(s.done)
	buf := make([]byte, 2048)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if err != nil {
			return
		}
		req := bytes.Clone(buf[:n])
		s.mu.Lock()
		s.reqs = append(s.reqs, req)
		s.mu.Unlock()
		for _, resp := range s.handle(req, from.(*net.UDPAddr).AddrPort()) {
			s.conn.WriteTo(resp, from)
		}
	}
}

func (s *udpServer) requests() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.reqs...)
}

func (s *udpServer) addr() netip.AddrPort { return s.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// natpmpGateway is a NAT-PMP server with scripted result codes.
type natpmpGateway struct {
	external   netip.Addr
	addrResult uint16
	mapResult  uint16
	extPort    uint16 // zero: the suggested port
	lifetime   uint32 // zero: what was asked
	silent     bool
	garbage    []byte // sent instead of every answer when set
}

func (g *natpmpGateway) handle(req []byte, _ netip.AddrPort) [][]byte {
	if g.silent {
		return nil
	}
	if g.garbage != nil {
		return [][]byte{g.garbage}
	}
	if len(req) < 2 {
		return nil
	}
	if req[0] != 0 {
		// As RFC 6886 says a NAT-PMP-only server answers PCP.
		b := make([]byte, 8)
		b[1] = 128 + req[1]&0x7f
		binary.BigEndian.PutUint16(b[2:4], natpmpResultBadVer)
		return [][]byte{b}
	}
	switch req[1] {
	case natpmpOpAddress:
		b := make([]byte, 12)
		b[1] = 128
		binary.BigEndian.PutUint16(b[2:4], g.addrResult)
		binary.BigEndian.PutUint32(b[4:8], 1000)
		copy(b[8:12], g.external.AsSlice())
		return [][]byte{b}
	case natpmpOpMapUDP:
		if len(req) < 12 {
			return nil
		}
		b := make([]byte, 16)
		b[1] = 128 + natpmpOpMapUDP
		binary.BigEndian.PutUint16(b[2:4], g.mapResult)
		binary.BigEndian.PutUint32(b[4:8], 1000)
		copy(b[8:10], req[4:6])
		ext, life := binary.BigEndian.Uint16(req[6:8]), binary.BigEndian.Uint32(req[8:12])
		if g.extPort != 0 && life != 0 {
			ext = g.extPort
		}
		if g.lifetime != 0 && life != 0 {
			life = g.lifetime
		}
		binary.BigEndian.PutUint16(b[10:12], ext)
		binary.BigEndian.PutUint32(b[12:16], life)
		return [][]byte{b}
	}
	return nil
}

// pcpGateway is a PCP server with scripted answers.
type pcpGateway struct {
	external  netip.Addr
	result    uint8
	extPort   uint16
	lifetime  uint32 // zero: what was asked
	silent    bool
	wrongOnce bool // first send an answer with another nonce
}

func (g *pcpGateway) handle(req []byte, from netip.AddrPort) [][]byte {
	if g.silent || len(req) < pcpHeaderLen+pcpMapLen || req[0] != pcpVersion || req[1] != pcpOpMap {
		return nil
	}
	resp := make([]byte, pcpHeaderLen+pcpMapLen)
	resp[0] = pcpVersion
	resp[1] = pcpOpMap | pcpReplyBit
	resp[3] = g.result
	client := netip.AddrFrom16([16]byte(req[8:24])).Unmap()
	if g.result == 0 && client != from.Addr() {
		resp[3] = 12 // ADDRESS_MISMATCH
	}
	life := binary.BigEndian.Uint32(req[4:8])
	if g.lifetime != 0 && life != 0 {
		life = g.lifetime
	}
	binary.BigEndian.PutUint32(resp[4:8], life)
	binary.BigEndian.PutUint32(resp[8:12], 77)
	copy(resp[pcpHeaderLen:], req[pcpHeaderLen:pcpHeaderLen+20])
	m := resp[pcpHeaderLen:]
	binary.BigEndian.PutUint16(m[18:20], g.extPort)
	putAddr16(m[20:36], g.external)
	out := [][]byte{resp}
	if g.wrongOnce {
		g.wrongOnce = false
		other := bytes.Clone(resp)
		other[pcpHeaderLen] ^= 0xff
		binary.BigEndian.PutUint16(other[pcpHeaderLen+18:], 1)
		out = [][]byte{other, resp}
	}
	return out
}

// upnpGateway is an IGD: an SSDP responder and an HTTP server with a description and
// a control URL whose answers a test scripts.
type upnpGateway struct {
	ip      netip.Addr
	ssdp    *udpServer
	http    *httptest.Server
	desc    string // description served; %s is replaced by the service type
	service string
	// soap answers an action: HTTP status and body. Nil answers success with no args.
	soap func(action string, args map[string]string) (int, string)

	mu    sync.Mutex
	calls []upnpCall
}

type upnpCall struct {
	Action string
	Args   map[string]string
}

const testDescription = `<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType><controlURL>/l3f</controlURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service><serviceType>%s</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId><controlURL>/ctl/IPConn</controlURL><SCPDURL>/scpd.xml</SCPDURL></service></serviceList>
</device></deviceList></device></deviceList></device></root>`

func startUPnP(t *testing.T, service string, soap func(action string, args map[string]string) (int, string)) *upnpGateway {
	t.Helper()
	g := &upnpGateway{ip: newGatewayAddr(t), desc: testDescription, service: service, soap: soap}
	ln, err := net.Listen("tcp4", netip.AddrPortFrom(g.ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	g.http = httptest.NewUnstartedServer(http.HandlerFunc(g.serveHTTP))
	g.http.Listener.Close()
	g.http.Listener = ln
	g.http.Start()
	t.Cleanup(g.http.Close)
	location := g.http.URL + "/rootDesc.xml"
	g.ssdp = startUDP(t, netip.AddrPortFrom(g.ip, 0), func(req []byte, _ netip.AddrPort) [][]byte {
		if !bytes.HasPrefix(req, []byte("M-SEARCH * HTTP/1.1\r\n")) {
			return nil
		}
		st := igdDevice1
		if bytes.Contains(req, []byte(igdDevice2)) {
			st = igdDevice2
		}
		return [][]byte{fmt.Appendf(nil, "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: %s\r\nUSN: uuid:test::%s\r\nEXT:\r\nSERVER: test UPnP/1.1\r\nLOCATION: %s\r\n\r\n", st, st, location)}
	})
	return g
}

func (g *upnpGateway) serveHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/rootDesc.xml":
		fmt.Fprintf(w, g.desc, g.service)
	case r.Method == http.MethodPost && r.URL.Path == "/ctl/IPConn":
		body, _ := io.ReadAll(r.Body)
		sa := strings.Trim(r.Header.Get("SOAPAction"), `"`)
		svc, action, _ := strings.Cut(sa, "#")
		if svc != g.service {
			http.Error(w, "wrong service "+svc, http.StatusBadRequest)
			return
		}
		args, err := soapRequestArgs(body, action)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		g.mu.Lock()
		g.calls = append(g.calls, upnpCall{action, args})
		g.mu.Unlock()
		status, resp := http.StatusOK, ""
		if g.soap != nil {
			status, resp = g.soap(action, args)
		}
		w.Header().Set("Content-Type", `text/xml; charset="utf-8"`)
		w.WriteHeader(status)
		io.WriteString(w, resp)
	default:
		http.NotFound(w, r)
	}
}

func (g *upnpGateway) callLog() []upnpCall {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]upnpCall(nil), g.calls...)
}

// soapRequestArgs reads an action request's arguments.
func soapRequestArgs(body []byte, action string) (map[string]string, error) {
	d := xml.NewDecoder(bytes.NewReader(body))
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("no %s element: %v", action, err)
		}
		if s, ok := tok.(xml.StartElement); ok && s.Name.Local == action {
			return soapArgs(d, s)
		}
	}
}

func soapOK(service, action string, args ...string) (int, string) {
	var b strings.Builder
	fmt.Fprintf(&b, `<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:%sResponse xmlns:u="%s">`, action, service)
	for i := 0; i+1 < len(args); i += 2 {
		fmt.Fprintf(&b, "<%s>%s</%s>", args[i], args[i+1], args[i])
	}
	fmt.Fprintf(&b, "</u:%sResponse></s:Body></s:Envelope>", action)
	return http.StatusOK, b.String()
}

func soapFaultBody(code int, desc string) (int, string) {
	return http.StatusInternalServerError, fmt.Sprintf(`<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>%d</errorCode><errorDescription>%s</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>`, code, desc)
}
