//! A model of incoherent photonic hardware running a non-negative network:
//! the mapping of each layer onto transmissions, the non-ideal effects of
//! real devices, hardware evaluation and the hardware count of the signed
//! alternatives. Formulas and units are in `docs/HARDWARE.md`.

mod cost;
mod effects;
mod eval;
mod mapping;
mod sweep;

pub use cost::{cost_table, CostRow, CostTable, Energies, Scheme, SchemeCount};
pub use effects::{quantise, Effects, InvalidEffect, MAX_BITS};
pub use eval::{
    evaluate, realise, HardwareAccuracy, HardwareTraining, NoiseSource, RealisedAffine, RealisedNetwork,
};
pub use mapping::{DeviceMapping, GainGranularity, LayerMapping, MappedLayer};
pub use sweep::{run_sweep, Sweep, SweepParameter, SweepPoint, SweepReport, SweepSeries};
