//! The self-supervised method: MaskDeep (and BYOL, its unmasked special case), its masks and the
//! target network's moving average. A new loss goes here.

pub mod ema;
pub mod maskdeep;
pub mod masking;
