// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title EpochRewards: per-epoch Merkle payouts of an entry node's revenue to the nodes that served it.
/// @notice A distributor (an entry node's wallet) publishes, for each of its epochs, a Merkle root over
///         (epochId, account, amount) and deposits the epoch's total in the payment token in the same call.
///         The epoch id is `epochId(distributor, number)`, so distributors never collide. Anyone may submit
///         a claim for an account (the tokens always go to the account); a second claim of the same payout
///         reverts, and claims never exceed the deposit.
///         Leaves are keccak256(bytes.concat(keccak256(abi.encode(epochId, account, amount)))), sorted-pair tree.
contract EpochRewards {
    using SafeERC20 for IERC20;

    struct Epoch {
        address distributor;
        bytes32 root;
        uint256 total;
        uint256 claimed;
    }

    IERC20 public immutable token;
    mapping(uint256 epochId => Epoch) private _epochs;
    mapping(uint256 epochId => mapping(address account => bool)) private _claimed;

    event EpochPublished(uint256 indexed epochId, address indexed distributor, uint256 number, bytes32 root, uint256 total);
    event Claimed(uint256 indexed epochId, address indexed account, uint256 amount);

    error EpochExists(uint256 epochId);
    error UnknownEpoch(uint256 epochId);
    error AlreadyClaimed(uint256 epochId, address account);
    error InvalidProof();
    error OverClaim();

    constructor(IERC20 token_) {
        token = token_;
    }

    function epochId(address distributor, uint256 number) public pure returns (uint256) {
        return uint256(keccak256(abi.encode(distributor, number)));
    }

    /// @notice Publish epoch `number` of the caller with its Merkle root; pulls `total` (needs an allowance).
    function publish(uint256 number, bytes32 root, uint256 total) external returns (uint256 id) {
        id = epochId(msg.sender, number);
        if (_epochs[id].distributor != address(0)) revert EpochExists(id);
        _epochs[id] = Epoch(msg.sender, root, total, 0);
        token.safeTransferFrom(msg.sender, address(this), total);
        emit EpochPublished(id, msg.sender, number, root, total);
    }

    function claim(uint256 epoch, address account, uint256 amount, bytes32[] calldata proof) external {
        Epoch storage e = _epochs[epoch];
        if (e.distributor == address(0)) revert UnknownEpoch(epoch);
        if (_claimed[epoch][account]) revert AlreadyClaimed(epoch, account);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(epoch, account, amount))));
        if (!MerkleProof.verifyCalldata(proof, e.root, leaf)) revert InvalidProof();
        if (e.claimed + amount > e.total) revert OverClaim();
        _claimed[epoch][account] = true;
        e.claimed += amount;
        token.safeTransfer(account, amount);
        emit Claimed(epoch, account, amount);
    }

    function isClaimed(uint256 epoch, address account) external view returns (bool) {
        return _claimed[epoch][account];
    }

    function getEpoch(uint256 epoch) external view returns (address distributor, bytes32 root, uint256 total, uint256 claimed) {
        Epoch storage e = _epochs[epoch];
        return (e.distributor, e.root, e.total, e.claimed);
    }
}
