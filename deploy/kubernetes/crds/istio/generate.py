#!/usr/bin/env python3
"""Writes the Istio CRDs sidenode installs (crds/istio/*.yaml) from one description of the fields
sidenode reads (mesh-node/src/model/istio.rs). Run from anywhere after editing: python3 generate.py
(needs python3-yaml). The output is committed; kustomize only reads the YAML.

The schemas are structural. Every object keeps fields sidenode does not model
(x-kubernetes-preserve-unknown-fields), as Istio's API has many more; the fields sidenode reads
get their type, ranges and enums, so a wrong value is refused by the API server with the
field's path rather than found later by the controller.
"""

import os
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))

# Istio's duration syntax as sidenode parses it: one number and one unit (`500ms`, `1.5s`, `2m`).
DURATION = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|ms|s|m|h)$"


def obj(props=None, required=None, desc=None, open_=True):
    s = {"type": "object"}
    if desc:
        s["description"] = desc
    if props:
        s["properties"] = props
    if required:
        s["required"] = required
    if open_:
        s["x-kubernetes-preserve-unknown-fields"] = True
    return s


def arr(items, desc=None):
    s = {"type": "array", "items": items}
    if desc:
        s["description"] = desc
    return s


def string(desc=None, **kw):
    s = {"type": "string"}
    if desc:
        s["description"] = desc
    s.update(kw)
    return s


def integer(desc=None, minimum=None, maximum=None):
    s = {"type": "integer"}
    if desc:
        s["description"] = desc
    if minimum is not None:
        s["minimum"] = minimum
    if maximum is not None:
        s["maximum"] = maximum
    return s


def duration(desc):
    return string(desc, pattern=DURATION)


def strings(desc=None):
    return arr(string(), desc)


def string_map(desc=None):
    s = {"type": "object", "additionalProperties": {"type": "string"}}
    if desc:
        s["description"] = desc
    return s


def port(desc="Port number (1-65535)."):
    return integer(desc, 1, 65535)


def string_match():
    return obj(
        {
            "exact": string("Exact match."),
            "prefix": string("Prefix match."),
            "regex": string("RE2 regular expression."),
        },
        desc="Exactly one of exact, prefix, regex.",
    )


def percent():
    return obj({"value": {"type": "number", "minimum": 0, "maximum": 100}})


def route_destination():
    return obj(
        {
            "destination": obj(
                {
                    "host": string("Service host name (short, FQDN or ServiceEntry host).", minLength=1),
                    "subset": string("A subset of the host's DestinationRule."),
                    "port": obj({"number": port()}),
                },
                required=["host"],
            ),
            "weight": integer("Share of traffic (0-100); with several destinations they total 100.", 0, 100),
        },
        required=["destination"],
    )


VIRTUAL_SERVICE = obj(
    {
        "hosts": arr(string(minLength=1), "Destination hosts the routing rules apply to."),
        "gateways": strings("Gateways and sidecars the rules apply to (`mesh` for all sidecars)."),
        "exportTo": strings("Namespaces the VirtualService is visible to (`.` or `*`)."),
        "http": arr(
            obj(
                {
                    "name": string(),
                    "match": arr(
                        obj(
                            {
                                "name": string(),
                                "uri": string_match(),
                                "method": string_match(),
                                "headers": {"type": "object", "additionalProperties": string_match()},
                                "port": port(),
                                "sourceLabels": string_map(),
                            }
                        )
                    ),
                    "route": arr(route_destination()),
                    "timeout": duration("Timeout of an HTTP request."),
                    "retries": obj(
                        {
                            "attempts": integer("Number of retries.", 0),
                            "perTryTimeout": duration("Timeout of each attempt."),
                            "retryOn": string(),
                        }
                    ),
                    "fault": obj(
                        {
                            "delay": obj(
                                {"fixedDelay": duration("Delay before forwarding."), "percentage": percent()}
                            ),
                            "abort": obj(
                                {
                                    "httpStatus": integer("HTTP status returned.", 200, 599),
                                    "percentage": percent(),
                                }
                            ),
                        }
                    ),
                }
            ),
            "HTTP routes, the first match wins.",
        ),
        "tcp": arr(
            obj(
                {
                    "match": arr(
                        obj(
                            {
                                "port": port(),
                                "destinationSubnets": strings(),
                                "sourceLabels": string_map(),
                                "sourceNamespace": string(),
                            }
                        )
                    ),
                    "route": arr(route_destination()),
                }
            ),
            "TCP routes, the first match wins.",
        ),
    },
    desc="Routing of traffic to hosts: https://istio.io/latest/docs/reference/config/networking/virtual-service/",
)


def traffic_policy():
    return obj(
        {
            "loadBalancer": obj(
                {
                    "simple": string(
                        enum=["UNSPECIFIED", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN"]
                    )
                }
            ),
            "connectionPool": obj(
                {
                    "tcp": obj(
                        {
                            "maxConnections": integer(None, 0),
                            "connectTimeout": duration("TCP connect timeout."),
                        }
                    ),
                    "http": obj(
                        {
                            "http1MaxPendingRequests": integer(None, 0),
                            "http2MaxRequests": integer(None, 0),
                            "maxRequestsPerConnection": integer(None, 0),
                        }
                    ),
                }
            ),
            "outlierDetection": obj(
                {
                    "consecutive5xxErrors": integer(None, 0),
                    "consecutiveGatewayErrors": integer(None, 0),
                    "interval": duration("Time between ejection sweeps."),
                    "baseEjectionTime": duration("Minimum ejection duration."),
                    "maxEjectionPercent": integer(None, 0, 100),
                }
            ),
        }
    )


DESTINATION_RULE = obj(
    {
        "host": string("The service the rule applies to.", minLength=1),
        "trafficPolicy": traffic_policy(),
        "subsets": arr(
            obj(
                {
                    "name": string("Subset name, referred to by VirtualService routes.", minLength=1),
                    "labels": string_map("Pod labels selecting the subset."),
                    "trafficPolicy": traffic_policy(),
                },
                required=["name"],
            )
        ),
        "exportTo": strings(),
    },
    required=["host"],
    desc="Policies applied after routing: https://istio.io/latest/docs/reference/config/networking/destination-rule/",
)


def selector():
    return obj({"matchLabels": string_map("Pod labels the policy applies to.")})


AUTHORIZATION_POLICY = obj(
    {
        "selector": selector(),
        "action": string("What a match does.", enum=["ALLOW", "DENY", "AUDIT", "CUSTOM"]),
        "rules": arr(
            obj(
                {
                    "from": arr(
                        obj(
                            {
                                "source": obj(
                                    {
                                        "principals": strings(),
                                        "notPrincipals": strings(),
                                        "namespaces": strings(),
                                        "notNamespaces": strings(),
                                        "ipBlocks": strings(),
                                        "notIpBlocks": strings(),
                                    }
                                )
                            }
                        )
                    ),
                    "to": arr(
                        obj(
                            {
                                "operation": obj(
                                    {
                                        "hosts": strings(),
                                        "notHosts": strings(),
                                        "ports": arr(string(pattern="^[0-9]+$")),
                                        "notPorts": arr(string(pattern="^[0-9]+$")),
                                        "methods": strings(),
                                        "notMethods": strings(),
                                        "paths": strings(),
                                        "notPaths": strings(),
                                    }
                                )
                            }
                        )
                    ),
                    "when": arr(
                        obj(
                            {"key": string(minLength=1), "values": strings(), "notValues": strings()},
                            required=["key"],
                        )
                    ),
                }
            )
        ),
    },
    desc="Access control: https://istio.io/latest/docs/reference/config/security/authorization-policy/",
)


def mtls():
    return obj(
        {"mode": string("mTLS mode.", enum=["UNSET", "DISABLE", "PERMISSIVE", "STRICT"])}
    )


PEER_AUTHENTICATION = obj(
    {
        "selector": selector(),
        "mtls": mtls(),
        "portLevelMtls": {
            "type": "object",
            "description": "Per-port mTLS mode (keys are port numbers; needs a selector).",
            "additionalProperties": mtls(),
        },
    },
    desc="Peer (mTLS) authentication: https://istio.io/latest/docs/reference/config/security/peer_authentication/",
)


TLS_VERSIONS = ["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"]

GATEWAY = obj(
    {
        "selector": string_map(
            "Labels of the gateway pods that serve this Gateway (all must match); sidenode's "
            "gateway has istio: ingressgateway."
        ),
        "servers": arr(
            obj(
                {
                    "port": obj(
                        {
                            "number": port(),
                            "protocol": string(
                                "HTTP, HTTPS, HTTP2 or TLS (sidenode's gateway serves these)."
                            ),
                            "name": string("Port name."),
                            "targetPort": port(),
                        },
                        required=["number"],
                    ),
                    "hosts": strings(
                        "Host names served: `*`, `*.example.com`, `example.com`, optionally "
                        "prefixed with `namespace/`."
                    ),
                    "tls": obj(
                        {
                            "httpsRedirect": {
                                "type": "boolean",
                                "description": "On an HTTP server: 301 every request to https.",
                            },
                            "mode": string(
                                "SIMPLE terminates TLS; PASSTHROUGH routes by SNI.",
                                enum=[
                                    "PASSTHROUGH",
                                    "SIMPLE",
                                    "MUTUAL",
                                    "AUTO_PASSTHROUGH",
                                    "ISTIO_MUTUAL",
                                    "OPTIONAL_MUTUAL",
                                ],
                            ),
                            "credentialName": string(
                                "The kubernetes.io/tls Secret (tls.crt, tls.key) in the "
                                "Gateway's namespace."
                            ),
                            "minProtocolVersion": string("Lowest TLS version.", enum=TLS_VERSIONS),
                            "maxProtocolVersion": string("Highest TLS version.", enum=TLS_VERSIONS),
                        }
                    ),
                    "name": string("Server name."),
                },
                required=["port"],
            ),
            "The listeners.",
        ),
    },
    desc="The listeners of an ingress gateway: https://istio.io/latest/docs/reference/config/networking/gateway/",
)


def crd(group, kind, plural, versions, spec_schema, short_names, categories, columns):
    schema = {
        "openAPIV3Schema": {
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": spec_schema,
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    }
    names = {"kind": kind, "listKind": kind + "List", "plural": plural, "singular": kind.lower()}
    if short_names:
        names["shortNames"] = short_names
    names["categories"] = categories
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{group}",
            "labels": {"app.kubernetes.io/part-of": "sidenode", "sidenode.io/crd-owner": "istio-api"},
        },
        "spec": {
            "group": group,
            "names": names,
            "scope": "Namespaced",
            "conversion": {"strategy": "None"},
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": v == "v1",
                    "schema": schema,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns
                    + [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                }
                for v in versions
            ],
        },
    }


CRDS = {
    "virtualservices.networking.istio.io.yaml": crd(
        "networking.istio.io",
        "VirtualService",
        "virtualservices",
        ["v1", "v1beta1", "v1alpha3"],
        VIRTUAL_SERVICE,
        ["vs"],
        ["istio-io", "networking-istio-io"],
        [
            {"name": "Gateways", "type": "string", "jsonPath": ".spec.gateways"},
            {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"},
        ],
    ),
    "destinationrules.networking.istio.io.yaml": crd(
        "networking.istio.io",
        "DestinationRule",
        "destinationrules",
        ["v1", "v1beta1", "v1alpha3"],
        DESTINATION_RULE,
        ["dr"],
        ["istio-io", "networking-istio-io"],
        [{"name": "Host", "type": "string", "jsonPath": ".spec.host"}],
    ),
    "gateways.networking.istio.io.yaml": crd(
        "networking.istio.io",
        "Gateway",
        "gateways",
        ["v1", "v1beta1", "v1alpha3"],
        GATEWAY,
        ["gw"],
        ["istio-io", "networking-istio-io"],
        [],
    ),
    "authorizationpolicies.security.istio.io.yaml": crd(
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
        ["v1", "v1beta1"],
        AUTHORIZATION_POLICY,
        [],
        ["istio-io", "security-istio-io"],
        [{"name": "Action", "type": "string", "jsonPath": ".spec.action"}],
    ),
    "peerauthentications.security.istio.io.yaml": crd(
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
        ["v1", "v1beta1"],
        PEER_AUTHENTICATION,
        ["pa"],
        ["istio-io", "security-istio-io"],
        [{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}],
    ),
}


class Dumper(yaml.SafeDumper):
    pass


# One schema object is shared by several versions: write it out each time, not as an anchor.
Dumper.ignore_aliases = lambda self, data: True

HEADER = "# Generated by generate.py in this folder from the fields sidenode reads; do not edit.\n"

for name, doc in CRDS.items():
    with open(os.path.join(HERE, name), "w") as f:
        f.write(HEADER)
        yaml.dump(doc, f, Dumper=Dumper, sort_keys=False, width=100)
