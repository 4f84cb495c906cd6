"""The dev agent against an independent Workload API client: py-spiffe
(PyPI `spiffe`, built on grpcio and cryptography), plus a raw gRPC call.

If the dev agent drifted from the SPIFFE Workload API spec (service name,
field numbers, DER encodings, the security header), these tests would be the
first to say so, because nothing here shares code with spiffe-tunnel."""

import time

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from spiffe import TrustDomain, WorkloadApiClient

TD = "example.org"
WEB = "spiffe://example.org/web"
API = "spiffe://example.org/api"


def uri_sans(cert: x509.Certificate):
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def test_py_spiffe_fetches_and_verifies_the_svid(dev_agent):
    agent = dev_agent("--trust-domain", TD, "--id", WEB, "--id", API, "--ttl", "1h")
    with WorkloadApiClient(socket_path=agent.address) as client:
        context = client.fetch_x509_context(timeout=10)

    svids = context.x509_svids
    assert [str(s.spiffe_id) for s in svids] == [WEB, API]
    default = context.default_svid
    assert str(default.spiffe_id) == WEB

    leaf = default.leaf
    assert uri_sans(leaf) == [WEB]
    ku = leaf.extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert not leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca

    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(TD))
    assert bundle is not None and len(bundle.x509_authorities) >= 1
    # The chain verifies against the bundle: each certificate is signed by
    # the next, the last by one of the bundle's authorities.
    chain = default.cert_chain
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    errors = []
    for authority in bundle.x509_authorities:
        try:
            chain[-1].verify_directly_issued_by(authority)
            break
        except Exception as e:  # noqa: BLE001 - any failure means "not this CA"
            errors.append(e)
    else:
        pytest.fail(f"the SVID chain does not verify against the bundle: {errors}")

    # The private key belongs to the leaf.
    assert default.private_key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_py_spiffe_sees_federated_bundles(dev_agent, tmp_path):
    # Any CA certificate will do as a federated bundle: take another agent's.
    other = dev_agent("--trust-domain", "partner.org", "--id", "spiffe://partner.org/x")
    with WorkloadApiClient(socket_path=other.address) as client:
        partner = client.fetch_x509_bundles(timeout=10).get_bundle_for_trust_domain(TrustDomain("partner.org"))
    from cryptography.hazmat.primitives.serialization import Encoding

    pem = tmp_path / "partner.pem"
    pem.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in partner.x509_authorities))

    # Like SPIRE, the dev agent hands a federated bundle only to an ID whose
    # entry federates with that trust domain.
    agent = dev_agent(
        "--trust-domain", TD, "--id", WEB, "--federate", f"partner.org={pem}", "--federates-with", f"{WEB}=partner.org"
    )
    with WorkloadApiClient(socket_path=agent.address) as client:
        bundles = client.fetch_x509_bundles(timeout=10)
        context = client.fetch_x509_context(timeout=10)
    assert bundles.get_bundle_for_trust_domain(TrustDomain(TD)) is not None
    fed = bundles.get_bundle_for_trust_domain(TrustDomain("partner.org"))
    assert fed is not None
    assert {c.serial_number for c in fed.x509_authorities} == {c.serial_number for c in partner.x509_authorities}
    assert context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("partner.org")) is not None


def test_py_spiffe_sees_rotation(dev_agent):
    agent = dev_agent("--trust-domain", TD, "--id", WEB, "--ttl", "2s")
    with WorkloadApiClient(socket_path=agent.address) as client:
        first = client.fetch_x509_svid(timeout=10).leaf.serial_number
        deadline = time.monotonic() + 10
        while True:
            current = client.fetch_x509_svid(timeout=10).leaf.serial_number
            if current != first:
                break
            assert time.monotonic() < deadline, "no rotation within 10s with a 2s TTL"
            time.sleep(0.1)


def test_raw_grpc_without_the_security_header_is_invalid_argument(dev_agent):
    agent = dev_agent("--trust-domain", TD, "--id", WEB)
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        fetch = channel.unary_stream(
            "/SpiffeWorkloadAPI/FetchX509SVID",
            request_serializer=lambda _: b"",  # X509SVIDRequest is empty
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as error:
            next(iter(fetch(None, timeout=10)))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "security header" in error.value.details()

        # With the header the same raw call gets an answer.
        first = next(iter(fetch(None, timeout=10, metadata=[("workload.spiffe.io", "true")])))
        assert len(first) > 100


def test_jwt_rpcs_are_unimplemented(dev_agent):
    agent = dev_agent("--trust-domain", TD, "--id", WEB)
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        fetch = channel.unary_unary(
            "/SpiffeWorkloadAPI/FetchJWTSVID",
            request_serializer=lambda _: b"",
            response_deserializer=lambda raw: raw,
        )
        with pytest.raises(grpc.RpcError) as error:
            fetch(None, timeout=10, metadata=[("workload.spiffe.io", "true")])
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
