//! Device models: plain state machines driven through their registers.
