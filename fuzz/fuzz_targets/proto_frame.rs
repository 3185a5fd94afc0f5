//! A device's Protobuf binary frame (`fleetgate.v1.proto`), decoded and handled as a gateway
//! session does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fleetgate_fuzz::device_frame(fleetgate_protocol::Codec::Protobuf, data);
});
