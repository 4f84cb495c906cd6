// Command gospiffe-peer is go-spiffe, the SPIFFE reference library, as a
// peer for spiffe-tunnel's interop tests. It is a test program, not a
// product: every subcommand does one small thing and says what happened on
// stderr so a test can assert on it.
//
//	gospiffe-peer server --socket ADDR --listen HOST:PORT (--allow-id ID | --allow-member-of TD)
//	gospiffe-peer client --socket ADDR --connect HOST:PORT (--expect-id ID | --expect-member-of TD) --message TEXT
//	gospiffe-peer verify --bundle TD=FILE [--bundle ...] CHAIN.pem
//	gospiffe-peer fetch --socket ADDR [--rpc x509svid|x509bundles] [--no-header]
//
// server and client take their X509-SVIDs and bundles from the Workload API
// at --socket (workloadapi.NewX509Source) and use spiffetls with the chosen
// tlsconfig authorizer. verify is x509svid.Verify with the same shape as
// `spiffe-tunnel verify`: it prints the SPIFFE ID and exits 0, or prints
// "invalid: REASON" and exits 1; usage errors exit 2. fetch is one raw gRPC
// call, its first answer (a status or the message's shape) printed as JSON:
// what a caller of some uid gets, for the conformance tests.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "server":
		os.Exit(runServer(args))
	case "client":
		os.Exit(runClient(args))
	case "verify":
		os.Exit(runVerify(args))
	case "fetch":
		os.Exit(runFetch(args))
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: gospiffe-peer server|client|verify|fetch [flags] (see the package comment)")
	os.Exit(exitUsage)
}

// repeated is a flag that may be given several times.
type repeated []string

func (r *repeated) String() string     { return strings.Join(*r, ",") }
func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }

// authorizerFlags selects one of go-spiffe's authorizers by flag.
type authorizerFlags struct {
	id, memberOf string
}

func (a *authorizerFlags) register(fs *flag.FlagSet, idFlag, memberFlag string) {
	fs.StringVar(&a.id, idFlag, "", "authorize exactly this SPIFFE ID (tlsconfig.AuthorizeID)")
	fs.StringVar(&a.memberOf, memberFlag, "", "authorize any ID of this trust domain (tlsconfig.AuthorizeMemberOf)")
}

func (a *authorizerFlags) authorizer() (tlsconfig.Authorizer, string, error) {
	switch {
	case a.id != "" && a.memberOf != "":
		return nil, "", errors.New("give one authorizer, not both")
	case a.id != "":
		id, err := spiffeid.FromString(a.id)
		if err != nil {
			return nil, "", fmt.Errorf("bad SPIFFE ID %q: %w", a.id, err)
		}
		return tlsconfig.AuthorizeID(id), "AuthorizeID(" + id.String() + ")", nil
	case a.memberOf != "":
		td, err := spiffeid.TrustDomainFromString(a.memberOf)
		if err != nil {
			return nil, "", fmt.Errorf("bad trust domain %q: %w", a.memberOf, err)
		}
		return tlsconfig.AuthorizeMemberOf(td), "AuthorizeMemberOf(" + td.String() + ")", nil
	default:
		return nil, "", errors.New("an authorizer is required")
	}
}

// sourceFlags says where the Workload API is and which SVID to use.
type sourceFlags struct {
	socket  string
	svid    string
	timeout time.Duration
}

func (s *sourceFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.socket, "socket", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "Workload API address, unix:///path/to/api.sock")
	fs.StringVar(&s.svid, "svid", "", "use the SVID with this SPIFFE ID (default: the first one)")
	fs.DurationVar(&s.timeout, "startup-timeout", 20*time.Second, "how long to wait for the first SVID")
}

// open waits for the first X509-SVID from the Workload API.
func (s *sourceFlags) open(ctx context.Context) (*workloadapi.X509Source, error) {
	if s.socket == "" {
		return nil, errors.New("--socket (or SPIFFE_ENDPOINT_SOCKET) is required")
	}
	options := []workloadapi.X509SourceOption{
		workloadapi.WithClientOptions(workloadapi.WithAddr(s.socket)),
	}
	if s.svid != "" {
		want := s.svid
		options = append(options, workloadapi.WithDefaultX509SVIDPicker(func(svids []*x509svid.SVID) *x509svid.SVID {
			for _, svid := range svids {
				if svid.ID.String() == want {
					return svid
				}
			}
			return svids[0]
		}))
	}
	startup, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	source, err := workloadapi.NewX509Source(startup, options...)
	if err != nil {
		return nil, fmt.Errorf("no X509-SVID from the Workload API at %s: %w", s.socket, err)
	}
	return source, nil
}
