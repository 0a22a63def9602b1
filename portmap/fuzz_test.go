package portmap

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"net/url"
	"strings"
	"testing"
)

// Every parser of what a gateway sends must return a value or an error wrapping
// ErrMalformed (or a *ResultError), and never panic.

func checkParseErr(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		return
	}
	var re *ResultError
	if !errors.Is(err, ErrMalformed) && !errors.As(err, &re) && !errors.Is(err, ErrNotSupported) {
		t.Fatalf("error %v wraps neither ErrMalformed, ErrNotSupported nor a ResultError", err)
	}
}

func natpmpSeed(op uint8, result uint16, size int) []byte {
	b := make([]byte, size)
	b[1] = 128 + op
	binary.BigEndian.PutUint16(b[2:4], result)
	if size >= 8 {
		binary.BigEndian.PutUint32(b[4:8], 99)
	}
	if size >= 12 {
		copy(b[8:12], []byte{198, 51, 100, 7})
	}
	if size >= 16 {
		binary.BigEndian.PutUint16(b[10:12], 40000)
		binary.BigEndian.PutUint32(b[12:16], 7200)
	}
	return b
}

func FuzzParseNATPMP(f *testing.F) {
	f.Add(natpmpSeed(natpmpOpAddress, 0, 12))
	f.Add(natpmpSeed(natpmpOpMapUDP, 0, 16))
	f.Add(natpmpSeed(natpmpOpMapUDP, 3, 8))
	f.Add(natpmpSeed(natpmpOpAddress, 1, 4))
	f.Add([]byte{0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := parseNATPMPAddress(b)
		checkParseErr(t, err)
		if err == nil && (len(b) < 12 || !a.External.Is4()) {
			t.Fatalf("accepted %x as %+v", b, a)
		}
		m, err := parseNATPMPMap(b, natpmpOpMapUDP)
		checkParseErr(t, err)
		if err == nil && (len(b) < 16 || m.Op != natpmpOpMapUDP) {
			t.Fatalf("accepted %x as %+v", b, m)
		}
	})
}

func FuzzParsePCP(f *testing.F) {
	ok := make([]byte, pcpHeaderLen+pcpMapLen)
	ok[0], ok[1] = pcpVersion, pcpOpMap|pcpReplyBit
	binary.BigEndian.PutUint32(ok[4:8], 7200)
	putAddr16(ok[pcpHeaderLen+20:], netip.MustParseAddr("198.51.100.7"))
	f.Add(ok)
	refused := append([]byte(nil), ok...)
	refused[3] = 2
	f.Add(refused)
	f.Add(ok[:pcpHeaderLen])
	f.Add([]byte{0, 129, 0, 1, 0, 0, 0, 0})         // NAT-PMP's unsupported version
	f.Add([]byte{1, 129, 0, 1})                     // an older PCP version
	f.Add(append(append([]byte(nil), ok...), 0, 1)) // not a multiple of 4
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parsePCPMap(b)
		checkParseErr(t, err)
		if err == nil && (len(b) < pcpHeaderLen+pcpMapLen || len(b)%4 != 0 || r.Result != 0) {
			t.Fatalf("accepted %x as %+v", b, r)
		}
	})
}

func FuzzParseSSDP(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nUSN: uuid:x::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\nLOCATION: http://192.168.1.1:5000/rootDesc.xml\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nLOCATION: https://192.168.1.1/x\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nLOCATION: http://router.local/x\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 404 Not Found\r\n\r\n"))
	f.Add([]byte("NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseSSDPResponse(b)
		checkParseErr(t, err)
		if err == nil {
			if r.Location == nil || r.Location.Scheme != "http" {
				t.Fatalf("accepted %q with location %v", b, r.Location)
			}
			if _, err := hostAddr(r.Location); err != nil {
				t.Fatalf("accepted %q with a non-IP host: %v", b, err)
			}
		}
	})
}

func FuzzParseDescription(f *testing.F) {
	for _, svc := range []string{wanIPService1, wanIPService2, wanPPPService1, "urn:x"} {
		f.Add(strings.Replace(testDescription, "%s", svc, 1), 2)
	}
	f.Add(`<root><URLBase>http://192.168.1.1:5000/</URLBase><device><serviceList><service><serviceType>`+wanIPService1+`</serviceType><controlURL>ctl</controlURL></service></serviceList></device></root>`, 1)
	f.Add(`<root><device><serviceList><service><serviceType>`+wanIPService1+`</serviceType><controlURL>http://10.0.0.9/ctl</controlURL></service></serviceList></device></root>`, 2)
	f.Add(`<root><device>`, 2)
	f.Add(``, 0)
	// A negative maxVersion once gave the service a negative version.
	f.Add(strings.Replace(testDescription, "%s", wanIPService2, 1), -63)
	loc, _ := url.Parse("http://192.168.1.1:5000/rootDesc.xml")
	f.Fuzz(func(t *testing.T, doc string, maxV int) {
		s, err := parseDescription([]byte(doc), loc, maxV)
		checkParseErr(t, err)
		if err == nil {
			if s.Control == nil || s.Control.Host != loc.Host || s.Control.Scheme != "http" {
				t.Fatalf("control URL %v off the description's host", s.Control)
			}
			if s.Version < 1 || s.Version > 2 {
				t.Fatalf("version %d", s.Version)
			}
		}
	})
}

func FuzzParseSOAP(f *testing.F) {
	_, ok := soapOK(wanIPService1, "GetExternalIPAddress", "NewExternalIPAddress", "198.51.100.7")
	f.Add(ok, "GetExternalIPAddress")
	_, fault := soapFaultBody(718, "ConflictInMappingEntry")
	f.Add(fault, "AddPortMapping")
	f.Add(`<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault><faultstring>x</faultstring></s:Fault></s:Body></s:Envelope>`, "AddPortMapping")
	f.Add(`<s:Envelope><s:Body><u:OtherResponse/></s:Body></s:Envelope>`, "AddPortMapping")
	f.Add(`<a><b>`, "X")
	f.Fuzz(func(t *testing.T, doc, action string) {
		_, err := parseSOAPResponse([]byte(doc), action)
		checkParseErr(t, err)
	})
}

func FuzzParseRoutes(f *testing.F) {
	f.Add(routeTable)
	f.Add("Iface\tDestination\n")
	f.Add("eth0\t00000000\t0101A8C0\t0003\t0\t0\t-1\t00000000\t0\t0\t0\n")
	f.Fuzz(func(t *testing.T, table string) {
		gw, err := parseRoutes([]byte(table))
		if err != nil {
			if !errors.Is(err, ErrNoGateway) && !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v", err)
			}
			return
		}
		if !gw.Is4() || gw.IsUnspecified() {
			t.Fatalf("gateway %v", gw)
		}
	})
}
