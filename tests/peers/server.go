package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// runServer accepts mTLS connections with spiffetls and answers one line
// per connection: "go-spiffe OURID to PEERID: LINE". Each handshake is
// logged on stderr as "accepted PEERID" or "refused: REASON", so a test can
// see which side refused a peer and why. Runs until SIGTERM or SIGINT.
func runServer(args []string) int {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	var source sourceFlags
	var authz authorizerFlags
	source.register(fs)
	authz.register(fs, "allow-id", "allow-member-of")
	listen := fs.String("listen", "127.0.0.1:0", "TCP address to listen on")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	authorizer, described, err := authz.authorizer()
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: %v\n", err)
		return exitUsage
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	x509Source, err := source.open(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: %v\n", err)
		return exitFailure
	}
	defer x509Source.Close()
	svid, err := x509Source.GetX509SVID()
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: %v\n", err)
		return exitFailure
	}
	listener, err := spiffetls.ListenWithMode(ctx, "tcp", *listen,
		spiffetls.MTLSServerWithSource(authorizer, x509Source))
	if err != nil {
		fmt.Fprintf(os.Stderr, "server: listen: %v\n", err)
		return exitFailure
	}
	go func() {
		<-ctx.Done()
		listener.Close()
	}()
	// The test reads this line to learn the port.
	fmt.Printf("listening %s as %s with %s\n", listener.Addr(), svid.ID, described)
	os.Stdout.Sync()

	for {
		conn, err := listener.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return exitOK
			}
			fmt.Fprintf(os.Stderr, "server: accept: %v\n", err)
			return exitFailure
		}
		go serveOne(conn, x509Source)
	}
}

// handshaker is what spiffetls's connections share with *tls.Conn.
type handshaker interface {
	net.Conn
	Handshake() error
}

func serveOne(conn net.Conn, source *workloadapi.X509Source) {
	defer conn.Close()
	tlsConn, ok := conn.(handshaker)
	if !ok {
		fmt.Fprintf(os.Stderr, "refused: not a TLS connection (%T)\n", conn)
		return
	}
	// Handshake now, so a refusal is logged here rather than at first read.
	if err := tlsConn.Handshake(); err != nil {
		fmt.Fprintf(os.Stderr, "refused: %v\n", err)
		return
	}
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		fmt.Fprintf(os.Stderr, "refused: %v\n", err)
		return
	}
	fmt.Fprintf(os.Stderr, "accepted %s\n", peer)
	ours := "(no SVID)"
	if svid, err := source.GetX509SVID(); err == nil {
		ours = svid.ID.String()
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintf(os.Stderr, "connection from %s ended before a line: %v\n", peer, err)
		return
	}
	fmt.Fprintf(conn, "go-spiffe %s to %s: %s", ours, peer, line)
}
