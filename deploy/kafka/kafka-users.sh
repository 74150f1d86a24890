#!/bin/sh
# Kafka users and ACLs of docker-compose.yml (one-shot `kafka-users`; docs/SECURITY.md "Tenants on Kafka").
#
# Why a script: the broker runs the StandardAuthorizer with allow.everyone.if.no.acl.found=false, so a
# SCRAM user can do nothing until it is granted. This creates, idempotently, from the environment only
# (no secret is written into docker-compose.yml):
#   * the platform user ${KAFKA_CLIENT_USER:-streamlearn} (password KAFKA_CLIENT_PASSWORD): a super user
#     (KAFKA_SUPER_USERS), used by the platform's own services and by the operator;
#   * one SCRAM user per tenant of KAFKA_TENANT_USERS ("acme:password,globex:password"; the user name is
#     the tenant id of its API keys) with PREFIXED ACLs on "<STREAMLEARN_TOPIC_PREFIX><tenant>." only:
#       topics             Read, Write, Describe, DescribeConfigs, Create
#       consumer groups    Read, Describe, Delete
#       transactional ids  Write, Describe
#     and nothing on the cluster or on any other name (Kafka hides the other tenants' topics too).
# It talks to the broker as the super user ANONYMOUS over the PLAINTEXT listener that binds the kafka
# container's loopback only (this service shares that network namespace), before any SCRAM user exists.
# Removing a tenant from the list does not revoke it: kafka-acls.sh --remove and kafka-configs.sh
# --delete-config do (docs/SECURITY.md).
set -eu

BIN=${KAFKA_BIN:-/opt/kafka/bin}
BOOTSTRAP=${KAFKA_ADMIN_BOOTSTRAP:-localhost:9095}
PREFIX=${STREAMLEARN_TOPIC_PREFIX:-}
PLATFORM=${KAFKA_CLIENT_USER:-streamlearn}
: "${KAFKA_CLIENT_PASSWORD:?set KAFKA_CLIENT_PASSWORD (the platform user's SCRAM password)}"
TENANTS=${KAFKA_TENANT_USERS:-}

fail() { echo "kafka-users: $*" >&2; exit 2; }

check_password() {  # $1 user, $2 password: kafka-configs.sh parses [a=b,c=d]
    case $2 in
        "" | *[],=[]*) fail "the password of $1 must be non-empty and contain none of , = [ ]";;
    esac
}

RESERVED_TENANTS="weblog sensor image models serving stream"  # schemas/access.py RESERVED_TENANTS

check_tenant() {  # the tenant id rule of schemas/access.py (tenant_problem): [a-z][a-z0-9-]{0,30}, not reserved
    if ! printf '%s' "$1" | grep -Eq '^[a-z][a-z0-9-]{0,30}$'; then
        fail "tenant '$1' in KAFKA_TENANT_USERS is not a tenant id ([a-z][a-z0-9-]{0,30})"
    fi
    for reserved in $RESERVED_TENANTS; do
        [ "$1" != "$reserved" ] || fail "tenant '$1' is reserved: the platform's own topics and groups start with '$1.'"
    done
    [ "$1" != "$PLATFORM" ] || fail "tenant '$1' has the platform user's name"
}

scram_user() {  # $1 user, $2 password
    "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --alter --entity-type users --entity-name "$1" \
        --add-config "SCRAM-SHA-512=[iterations=8192,password=$2]"
}

grant() {  # $1 tenant, $2 resource flag (--topic | --group | --transactional-id), $3... operations
    tenant=$1 resource=$2
    shift 2
    ops=""
    for op in "$@"; do ops="$ops --operation $op"; done
    # shellcheck disable=SC2086 # $ops is a list of flags on purpose
    "$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --add --allow-principal "User:$tenant" \
        $ops "$resource" "$PREFIX$tenant." --resource-pattern-type prefixed
}

# Validate everything first: a typo in the list must not leave half the tenants configured.
check_password "$PLATFORM" "$KAFKA_CLIENT_PASSWORD"
OLD_IFS=$IFS
IFS=,
for entry in $TENANTS; do
    entry=$(printf '%s' "$entry" | tr -d ' ')
    [ -n "$entry" ] || continue
    case $entry in *:*) ;; *) fail "KAFKA_TENANT_USERS entry without a password (tenant:password)";; esac
    check_tenant "${entry%%:*}"
    check_password "${entry%%:*}" "${entry#*:}"
done

IFS=$OLD_IFS
scram_user "$PLATFORM" "$KAFKA_CLIENT_PASSWORD"
echo "kafka-users: platform user $PLATFORM (super user)"
IFS=,
for entry in $TENANTS; do
    IFS=$OLD_IFS
    entry=$(printf '%s' "$entry" | tr -d ' ')
    [ -n "$entry" ] || { IFS=,; continue; }
    tenant=${entry%%:*}
    scram_user "$tenant" "${entry#*:}"
    grant "$tenant" --topic Read Write Describe DescribeConfigs Create
    grant "$tenant" --group Read Describe Delete
    grant "$tenant" --transactional-id Write Describe
    echo "kafka-users: tenant $tenant: prefixed ACLs on $PREFIX$tenant."
    IFS=,
done
IFS=$OLD_IFS
