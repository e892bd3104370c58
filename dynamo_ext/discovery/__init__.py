"""dynamo_ext.discovery — etcd and NATS adapters: leased worker records, watches. Contract: README.md here."""

from .env import (
    DiscoverySettingError,
    EtcdCredentials,
    dynamo_env,
    etcd_credentials,
    etcd_is_plain,
    is_plain,
    nats_is_plain,
    nats_options,
)
from .etcd import (
    DiscoveryError,
    EtcdAuthError,
    EtcdStore,
    EtcdUnavailable,
    KeyValue,
    Lease,
    LeaseNotFound,
    Listing,
    Watch,
    WatchEvent,
)
from .nats import EventBus, Message, NatsUnavailable, Subscription
from .records import (
    InvalidRecord,
    PoolDescriptor,
    WorkerChange,
    WorkerRecord,
    WorkerRegistry,
    decode_record,
    encode_record,
    parse_worker_key,
    worker_key,
)

__all__ = [
    "DiscoverySettingError", "EtcdCredentials", "dynamo_env", "etcd_credentials", "etcd_is_plain", "is_plain",
    "nats_is_plain", "nats_options",
    "EtcdAuthError", "DiscoveryError", "EtcdStore", "EtcdUnavailable", "KeyValue", "Lease", "LeaseNotFound", "Listing", "Watch",
    "WatchEvent", "EventBus", "Message", "NatsUnavailable", "Subscription", "InvalidRecord", "PoolDescriptor",
    "WorkerChange", "WorkerRecord", "WorkerRegistry", "decode_record", "encode_record", "parse_worker_key",
    "worker_key",
]
