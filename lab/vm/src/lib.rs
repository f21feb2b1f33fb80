//! The lab micro-VM (lands with the lab issue).
