package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls"
)

// runClient dials with spiffetls (MTLSClientWithSource and the chosen
// authorizer), sends --message and a newline, half-closes, and prints what
// comes back until the server closes. Exit 0 on an answer; 1 with the
// reason on stderr otherwise.
func runClient(args []string) int {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	var source sourceFlags
	var authz authorizerFlags
	source.register(fs)
	authz.register(fs, "expect-id", "expect-member-of")
	connect := fs.String("connect", "", "HOST:PORT to dial")
	message := fs.String("message", "ping", "the line to send")
	timeout := fs.Duration("timeout", 10*time.Second, "how long the whole exchange may take")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	authorizer, _, err := authz.authorizer()
	if err != nil || *connect == "" {
		if err == nil {
			err = fmt.Errorf("--connect is required")
		}
		fmt.Fprintf(os.Stderr, "client: %v\n", err)
		return exitUsage
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout+source.timeout)
	defer cancel()
	x509Source, err := source.open(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "client: %v\n", err)
		return exitFailure
	}
	defer x509Source.Close()

	conn, err := spiffetls.DialWithMode(ctx, "tcp", *connect,
		spiffetls.MTLSClientWithSource(authorizer, x509Source))
	if err != nil {
		fmt.Fprintf(os.Stderr, "client: dial %s: %v\n", *connect, err)
		return exitFailure
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(*timeout))
	if _, err := fmt.Fprintf(conn, "%s\n", *message); err != nil {
		fmt.Fprintf(os.Stderr, "client: write: %v%s\n", err, unreadRefusal(conn))
		return exitFailure
	}
	if closer, ok := conn.(interface{ CloseWrite() error }); ok {
		if err := closer.CloseWrite(); err != nil {
			fmt.Fprintf(os.Stderr, "client: half-close: %v%s\n", err, unreadRefusal(conn))
			return exitFailure
		}
	}
	answer, err := io.ReadAll(conn)
	if err != nil {
		fmt.Fprintf(os.Stderr, "client: read: %v (after %q)\n", err, answer)
		return exitFailure
	}
	if len(answer) == 0 {
		fmt.Fprintln(os.Stderr, "client: the server closed without an answer")
		return exitFailure
	}
	if peer, err := spiffetls.PeerIDFromConn(conn); err == nil {
		fmt.Fprintf(os.Stderr, "server was %s\n", peer)
	}
	os.Stdout.Write(answer)
	return exitOK
}

// unreadRefusal reads what a server sent before it closed: in TLS 1.3 a
// server refuses our certificate after our side of the handshake is done,
// sends an alert and closes, and our next write may fail on the closed
// socket before the alert is read. The alert says why.
func unreadRefusal(conn net.Conn) string {
	_ = conn.SetReadDeadline(time.Now().Add(time.Second))
	if _, err := conn.Read(make([]byte, 256)); err != nil {
		return "; the server had sent: " + err.Error()
	}
	return ""
}
