"""The lossy-network testbed: namespaces, veth links, nftables loss, tc bandwidth, CPU caps."""
