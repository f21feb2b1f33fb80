//! Running CNI plugins the way a runtime does.
