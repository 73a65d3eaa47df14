//! Leaf helpers that every layer may use and that use nothing of emlab's own: the clock
//! ([`time`]), facts about the machine for `bench` records ([`machine`]), the one seeded
//! random-number generator ([`rng`]), atomic file writes ([`fs`]), file-format pieces shared
//! by importers ([`parse`]: the `file:line: what was expected` error; [`csv`]; Python
//! literals in [`pylit`]), [`layers`], layer lists as options take them; [`choice`], the plain named enums the CLI offers as values, and
//! [`hint`], the trait through which every error type says how to fix it; [`prof`], where a bench run's time goes; [`remote`], the
//! object-storage target of `export --to`.

pub mod choice;
pub mod csv;
pub mod fs;
pub mod hint;
pub mod layers;
pub mod machine;
pub mod parse;
pub mod prof;
pub mod pylit;
pub mod remote;
pub mod rng;
pub mod time;
