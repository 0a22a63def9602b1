package natlab

// Stats counts packets by what happened to them. Network.Stats totals the whole
// network; NAT.Stats counts what one NAT and its uplink did (its Sent and Delivered
// stay zero).
type Stats struct {
	Sent       uint64 // written by sockets
	Delivered  uint64 // queued on a receiving socket
	Translated uint64 // outbound packets a NAT rewrote (a firewall: let out)
	Admitted   uint64 // inbound packets a NAT let into its LAN
	Hairpinned uint64 // packets a NAT turned back inside
	Mappings   uint64 // mappings created

	// Drops, one counter per reason.
	Lost       uint64 // dropped by a lossy link
	NoRoute    uint64 // nothing owns the destination address
	NoMapping  uint64 // reached a NAT port that no mapping uses
	Expired    uint64 // reached a mapping that had timed out
	Filtered   uint64 // refused by the NAT's filtering policy
	NoHairpin  uint64 // sent to the NAT's own public address with hairpinning off
	Blocked    uint64 // dropped by a BlockUDP NAT or firewall
	NoPort     uint64 // the NAT had no free port for a new mapping
	NoListener uint64 // reached a host with no socket on the port
	QueueFull  uint64 // the receiving socket's queue was full
}

// Dropped is the total of the drop counters.
func (s Stats) Dropped() uint64 {
	return s.Lost + s.NoRoute + s.NoMapping + s.Expired + s.Filtered + s.NoHairpin +
		s.Blocked + s.NoPort + s.NoListener + s.QueueFull
}

// event is a counted fate; events index counts arrays.
type event uint8

const (
	evSent event = iota
	evDelivered
	evTranslated
	evAdmitted
	evHairpinned
	evMappings
	evLost
	evNoRoute
	evNoMapping
	evExpired
	evFiltered
	evNoHairpin
	evBlocked
	evNoPort
	evNoListener
	evQueueFull
	numEvents
)

var eventNames = [numEvents]string{
	"sent", "delivered", "translated", "admitted", "hairpinned", "mappings",
	"lost", "no route", "no mapping", "expired", "filtered", "no hairpin", "blocked",
	"no port", "no listener", "queue full",
}

func (e event) String() string { return eventNames[e] }

type counts [numEvents]uint64

func (c *counts) stats() Stats {
	return Stats{
		Sent:       c[evSent],
		Delivered:  c[evDelivered],
		Translated: c[evTranslated],
		Admitted:   c[evAdmitted],
		Hairpinned: c[evHairpinned],
		Mappings:   c[evMappings],
		Lost:       c[evLost],
		NoRoute:    c[evNoRoute],
		NoMapping:  c[evNoMapping],
		Expired:    c[evExpired],
		Filtered:   c[evFiltered],
		NoHairpin:  c[evNoHairpin],
		Blocked:    c[evBlocked],
		NoPort:     c[evNoPort],
		NoListener: c[evNoListener],
		QueueFull:  c[evQueueFull],
	}
}
