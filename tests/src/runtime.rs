//! Real container runtimes (containerd + runc) for end-to-end CNI tests.
