//! warren-ipam (placeholder until the allocator lands).
