// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/// @title IdentityRegistry: ERC-8004 agent identities for mesh402 nodes.
/// @notice Each agent is an ERC-721 token ("AgentIdentity"/"AGENT"); ids start at 0. The owner (or an
///         approved operator) sets the agent URI (the registration file) and free-form metadata. The key
///         "agentWallet" is reserved: registration sets it to the registrant, and changing it needs an
///         EIP-712 `AgentWalletSet` signature from the new wallet (EOA or ERC-1271), with a deadline at
///         most five minutes ahead. Transferring the token clears it.
///         Written for mesh402 against the ERC-8004 interface; not upgradeable.
contract IdentityRegistry is ERC721, EIP712 {
    struct MetadataEntry {
        string metadataKey;
        bytes metadataValue;
    }

    bytes32 public constant AGENT_WALLET_SET_TYPEHASH =
        keccak256("AgentWalletSet(uint256 agentId,address newWallet,address owner,uint256 deadline)");
    uint256 public constant MAX_DEADLINE_DELAY = 5 minutes;
    string private constant WALLET_KEY = "agentWallet";
    bytes32 private constant WALLET_KEY_HASH = keccak256(bytes(WALLET_KEY));

    uint256 private _count;
    mapping(uint256 agentId => string) private _uris;
    mapping(uint256 agentId => mapping(string key => bytes)) private _meta;

    event Registered(uint256 indexed agentId, string agentURI, address indexed owner);
    event MetadataSet(uint256 indexed agentId, string indexed indexedMetadataKey, string metadataKey, bytes metadataValue);
    event URIUpdated(uint256 indexed agentId, string newURI, address indexed updatedBy);

    error NotAgentOperator(address caller, uint256 agentId);
    error ReservedMetadataKey(string key);
    error WalletProofExpired(uint256 deadline);
    error WalletProofDeadlineTooFar(uint256 deadline);
    error InvalidWalletProof(address wallet);
    error ZeroWallet();

    constructor() ERC721("AgentIdentity", "AGENT") EIP712("ERC8004IdentityRegistry", "1") {}

    // ---- registration -------------------------------------------------------------------------

    function register() external returns (uint256 agentId) {
        agentId = _newAgent("");
    }

    function register(string calldata agentURI) external returns (uint256 agentId) {
        agentId = _newAgent(agentURI);
    }

    function register(string calldata agentURI, MetadataEntry[] calldata metadata) external returns (uint256 agentId) {
        agentId = _newAgent(agentURI);
        for (uint256 i = 0; i < metadata.length; ++i) {
            _putMeta(agentId, metadata[i].metadataKey, metadata[i].metadataValue);
        }
    }

    function totalAgents() external view returns (uint256) {
        return _count;
    }

    // ---- URI and metadata ---------------------------------------------------------------------

    function setAgentURI(uint256 agentId, string calldata newURI) external {
        _onlyOperator(agentId);
        _uris[agentId] = newURI;
        emit URIUpdated(agentId, newURI, msg.sender);
    }

    function tokenURI(uint256 agentId) public view override returns (string memory) {
        _requireOwned(agentId);
        return _uris[agentId];
    }

    function getMetadata(uint256 agentId, string calldata metadataKey) external view returns (bytes memory) {
        return _meta[agentId][metadataKey];
    }

    function setMetadata(uint256 agentId, string calldata metadataKey, bytes calldata metadataValue) external {
        _onlyOperator(agentId);
        _putMeta(agentId, metadataKey, metadataValue);
    }

    // ---- agent wallet -------------------------------------------------------------------------

    function getAgentWallet(uint256 agentId) external view returns (address) {
        bytes memory raw = _meta[agentId][WALLET_KEY];
        return raw.length == 20 ? address(bytes20(raw)) : address(0);
    }

    function setAgentWallet(uint256 agentId, address newWallet, uint256 deadline, bytes calldata signature) external {
        address owner = _onlyOperator(agentId);
        if (newWallet == address(0)) revert ZeroWallet();
        if (block.timestamp > deadline) revert WalletProofExpired(deadline);
        if (deadline > block.timestamp + MAX_DEADLINE_DELAY) revert WalletProofDeadlineTooFar(deadline);
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(AGENT_WALLET_SET_TYPEHASH, agentId, newWallet, owner, deadline)));
        if (!SignatureChecker.isValidSignatureNow(newWallet, digest, signature)) revert InvalidWalletProof(newWallet);
        _writeWallet(agentId, abi.encodePacked(newWallet));
    }

    function unsetAgentWallet(uint256 agentId) external {
        _onlyOperator(agentId);
        _writeWallet(agentId, "");
    }

    /// @notice The EIP-712 digest a new wallet signs to become the agent's wallet (a convenience for clients).
    function agentWalletDigest(uint256 agentId, address newWallet, address owner, uint256 deadline) external view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(AGENT_WALLET_SET_TYPEHASH, agentId, newWallet, owner, deadline)));
    }

    // ---- access -------------------------------------------------------------------------------

    /// @notice True if `spender` owns the agent or is approved for it; reverts for an unknown agent.
    function isAuthorizedOrOwner(address spender, uint256 agentId) public view returns (bool) {
        address owner = _requireOwned(agentId);
        return _isAuthorized(owner, spender, agentId);
    }

    function getVersion() external pure returns (string memory) {
        return "2.0.0";
    }

    // ---- internals ----------------------------------------------------------------------------

    function _newAgent(string memory uri) private returns (uint256 agentId) {
        agentId = _count++;
        _mint(msg.sender, agentId);
        _uris[agentId] = uri;
        emit Registered(agentId, uri, msg.sender);
        _writeWallet(agentId, abi.encodePacked(msg.sender));
    }

    function _onlyOperator(uint256 agentId) private view returns (address owner) {
        owner = _requireOwned(agentId);
        if (!_isAuthorized(owner, msg.sender, agentId)) revert NotAgentOperator(msg.sender, agentId);
    }

    function _putMeta(uint256 agentId, string calldata key, bytes calldata value) private {
        if (keccak256(bytes(key)) == WALLET_KEY_HASH) revert ReservedMetadataKey(key);
        _meta[agentId][key] = value;
        emit MetadataSet(agentId, key, key, value);
    }

    function _writeWallet(uint256 agentId, bytes memory value) private {
        _meta[agentId][WALLET_KEY] = value;
        emit MetadataSet(agentId, WALLET_KEY, WALLET_KEY, value);
    }

    /// @dev A transfer (not a mint or burn) clears the agent wallet: the new owner must prove a wallet again.
    function _update(address to, uint256 tokenId, address auth) internal override returns (address from) {
        from = super._update(to, tokenId, auth);
        if (from != address(0) && to != address(0) && _meta[tokenId][WALLET_KEY].length != 0) {
            _writeWallet(tokenId, "");
        }
    }
}
