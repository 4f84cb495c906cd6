package main

import (
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// runVerify is x509svid.Verify of a PEM chain (leaf first) against PEM
// bundles per trust domain, shaped like `spiffe-tunnel verify`: the SPIFFE
// ID on stdout and exit 0, or "invalid: REASON" on stdout and exit 1. A
// certificate that does not parse is invalid too (exit 1); only bad flags
// and unreadable files are usage errors (exit 2).
func runVerify(args []string) int {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	var bundleArgs repeated
	fs.Var(&bundleArgs, "bundle", "TD=FILE: PEM CA certificates of a trust domain (repeatable)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() != 1 || len(bundleArgs) == 0 {
		fmt.Fprintln(os.Stderr, "verify: give --bundle TD=FILE at least once and one CHAIN.pem")
		return exitUsage
	}
	set := x509bundle.NewSet()
	for _, arg := range bundleArgs {
		name, path, ok := strings.Cut(arg, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "verify: --bundle %q: expected TD=FILE\n", arg)
			return exitUsage
		}
		td, err := spiffeid.TrustDomainFromString(name)
		if err != nil {
			fmt.Fprintf(os.Stderr, "verify: --bundle %q: %v\n", arg, err)
			return exitUsage
		}
		bundle, err := x509bundle.Load(td, path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "verify: --bundle %q: %v\n", arg, err)
			return exitUsage
		}
		set.Add(bundle)
	}
	raw, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		fmt.Fprintf(os.Stderr, "verify: %v\n", err)
		return exitUsage
	}
	var chain []*x509.Certificate
	for block, rest := pem.Decode(raw); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fmt.Printf("invalid: certificate %d does not parse: %v\n", len(chain), err)
			return exitFailure
		}
		chain = append(chain, cert)
	}
	id, _, err := x509svid.Verify(chain, set)
	if err != nil {
		fmt.Printf("invalid: %v\n", err)
		return exitFailure
	}
	fmt.Println(id)
	return exitOK
}
