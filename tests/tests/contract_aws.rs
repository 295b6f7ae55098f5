//! The port contract on the AWS adapters, against the moto server that `scripts/test.sh`
//! starts on loopback (`FLEET_TEST_AWS_ENDPOINT`). See `fleet_tests::contract` for what moto
//! can and cannot check.

use fleet_tests::moto;

fleet_tests::port_contract!(
    #[ignore = "needs the moto server started by scripts/test.sh"]
    ports = moto::fresh_ports()
);
