//! The networks: layers that hold parameters and call the ops of [`crate::ops`] (they never look
//! at the device or dtype), the ResNet backbone, the MLP heads and the parameter rules.

pub mod batch_norm;
pub mod conv;
pub mod heads;
pub mod params;
pub mod resnet;
