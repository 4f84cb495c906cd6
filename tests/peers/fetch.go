package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// fetched is what one raw Workload API call answered, as JSON: either a
// status (code and message) or the first message's shape.
type fetched struct {
	Code             string         `json:"code,omitempty"`
	Message          string         `json:"message,omitempty"`
	SVIDs            []fetchedSVID  `json:"svids,omitempty"`
	Bundles          map[string]int `json:"bundles,omitempty"`
	FederatedBundles map[string]int `json:"federated_bundles,omitempty"`
}

type fetchedSVID struct {
	SPIFFEID string `json:"spiffe_id"`
	Hint     string `json:"hint"`
	// Certificates in x509_svid and bundle (concatenated DER).
	ChainCerts  int `json:"chain_certs"`
	BundleCerts int `json:"bundle_certs"`
}

// runFetch makes one raw gRPC call (the generated client, no go-spiffe
// logic on top) and prints its first answer as JSON, so a test can run it
// as another uid and see exactly what that caller gets. Exit 0 whenever
// the server answered (a status is an answer), 1 when it could not be
// reached.
func runFetch(args []string) int {
	fs := flag.NewFlagSet("fetch", flag.ContinueOnError)
	socket := fs.String("socket", os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "Workload API address, unix:///path/to/api.sock")
	rpc := fs.String("rpc", "x509svid", "x509svid (FetchX509SVID) or x509bundles (FetchX509Bundles)")
	noHeader := fs.Bool("no-header", false, "leave out the workload.spiffe.io security header")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the answer")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if !strings.HasPrefix(*socket, "unix://") {
		fmt.Fprintln(os.Stderr, "fetch: --socket must be unix:///path")
		return exitUsage
	}
	conn, err := grpc.NewClient(*socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintf(os.Stderr, "fetch: %v\n", err)
		return exitFailure
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if !*noHeader {
		ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	}
	client := workload.NewSpiffeWorkloadAPIClient(conn)

	var out fetched
	switch *rpc {
	case "x509svid":
		err = firstSVIDs(ctx, client, &out)
	case "x509bundles":
		err = firstBundles(ctx, client, &out)
	default:
		fmt.Fprintf(os.Stderr, "fetch: unknown --rpc %q\n", *rpc)
		return exitUsage
	}
	if err != nil {
		s, ok := status.FromError(err)
		if !ok || s.Code().String() == "Unavailable" || s.Code().String() == "DeadlineExceeded" {
			fmt.Fprintf(os.Stderr, "fetch: %v\n", err)
			return exitFailure
		}
		out = fetched{Code: s.Code().String(), Message: s.Message()}
	}
	text, _ := json.Marshal(out)
	fmt.Println(string(text))
	return exitOK
}

func firstSVIDs(ctx context.Context, client workload.SpiffeWorkloadAPIClient, out *fetched) error {
	stream, err := client.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err != nil {
		return err
	}
	response, err := stream.Recv()
	if err != nil {
		return err
	}
	for _, svid := range response.Svids {
		out.SVIDs = append(out.SVIDs, fetchedSVID{
			SPIFFEID:    svid.SpiffeId,
			Hint:        svid.Hint,
			ChainCerts:  certCount(svid.X509Svid),
			BundleCerts: certCount(svid.Bundle),
		})
	}
	out.FederatedBundles = certCounts(response.FederatedBundles)
	return nil
}

func firstBundles(ctx context.Context, client workload.SpiffeWorkloadAPIClient, out *fetched) error {
	stream, err := client.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
	if err != nil {
		return err
	}
	response, err := stream.Recv()
	if err != nil {
		return err
	}
	out.Bundles = certCounts(response.Bundles)
	return nil
}

// certCount is how many certificates concatenated DER holds; -1 when it
// does not parse.
func certCount(der []byte) int {
	certs, err := x509.ParseCertificates(der)
	if err != nil {
		return -1
	}
	return len(certs)
}

func certCounts(bundles map[string][]byte) map[string]int {
	keys := make([]string, 0, len(bundles))
	for key := range bundles {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	out := make(map[string]int, len(keys))
	for _, key := range keys {
		out[key] = certCount(bundles[key])
	}
	return out
}
